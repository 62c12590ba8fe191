"""The chain-of-cores convolution that tensor-train and tensor-ring factorizations share, and its SVD sweep.

A k x k kernel ``W[o, i, kh, kw]`` is seen as a tensor of order ``D = d + 1 + e``::

    T[n_1, ..., n_d, s, m_1, ..., m_e] = W[o(m_1..m_e), i(n_d..n_1), s]

where the input channels are factored into ``n_1 .. n_d`` (``n_1`` the fastest-varying factor of
the channel index), the kernel positions form one spatial mode ``s = kh * kw``, and the output
channels are factored into ``m_1 .. m_e`` (``m_1`` the slowest). :func:`channel_modes` picks the
factors: the most balanced pair, or the channel count alone when it is prime (or 1). A chain of
cores ``Z_k`` of shape ``(r_{k-1}, size_k, r_k)`` with ``r_0 = r_D = g`` (the *ring* rank; 1 for a
tensor train) stands for ``T = trace(Z_1[n_1] ... Z_D[m_e])``.

:class:`TensorNetworkConv` runs the chain on a feature map, never rebuilding the kernel, as a
sequence of convolutions (:class:`SharedConv`: one small weight applied to several channel groups,
i.e. a grouped convolution whose groups share their weight). In channel order, slowest first:

* ``in1``, 1x1: ``(n_d..n_2 | n_1) -> (n_d..n_2 | g, r_1)``, one ``n_1 -> g r_1`` map per group;
  then the ring index is moved first (a channel permutation, only when ``g > 1``);
* ``in_k``, 1x1: ``(g, n_d..n_{k+1} | n_k, r_{k-1}) -> (g, n_d..n_{k+1} | r_k)``;
* ``core``, k x k with the layer's stride, padding and dilation: ``(g | r_d) -> (g | r_{d+1})``;
* ``out_j``, 1x1: ``(g, m_1..m_{j-1} | R_j) -> (g, m_1..m_{j-1} | m_j, R_{j+1})``;
* ``out_e``, 1x1 with the layer's bias, after moving the ring index last but one:
  ``(m_1..m_{e-1} | g, R_e) -> (m_1..m_{e-1} | m_e)``.

A 1x1 convolution is the same chain with a spatial mode of size 1 (``core`` is 1x1 too), and a
linear layer ``(out, in)`` is that chain on a 1 x 1 map: the module reshapes ``(N, in)`` to
``(N, in, 1, 1)``, runs the convolutions and flattens the result back to ``(N, out)``.

Every product is a convolution, so ``FlopCounterMode`` and :func:`rlrank.flops.count_model` count
them exactly; :func:`chain_macs` is that count (one input, ``P_k = n_{k+1} ... n_d``,
``M_j = m_1 ... m_j``, ``R_j = r_{d+j}``)::

    HW_in  * (C_in * g * r_1 + sum_{k=2..d} g * P_k * n_k * r_{k-1} * r_k)
  + HW_out * (g * r_d * r_{d+1} * kh * kw + sum_{j<e} g * M_{j-1} * R_j * m_j * R_{j+1} + C_out * g * R_e)

and :func:`chain_params` the cores' sizes ``sum_k r_{k-1} size_k r_k`` (plus the bias).

:func:`svd_sweep` is the sequential truncated SVD (TT-SVD, Oseledets 2011) both methods decompose
with; ranks above what an unfolding offers are padded with zero slices, so any ranks build.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from rlrank.layers import LayerInfo
from rlrank.methods.base import (
    DecompositionError,
    FactorizedLayer,
    Geometry,
    conv_geometry,
    linear_geometry,
    thin_svd,
)

MEMO_SIZE = 32
"""Factorizations kept per layer (least recently used dropped first)."""


def channel_modes(channels: int) -> tuple[int, ...]:
    """The modes a channel count is factored into: ``(a, b)``, ``a >= b > 1``, ``a * b = channels``
    with ``b`` the largest divisor up to the square root, or ``(channels,)`` when there is none."""
    b = max((k for k in range(2, math.isqrt(channels) + 1) if channels % k == 0), default=1)
    return (channels,) if b == 1 else (channels // b, b)


def mode_sizes(geometry: Geometry | LayerInfo) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
    """``(in modes n_1..n_d, spatial size, out modes m_1..m_e)`` of a layer (the tensor's order)."""
    get = geometry.get if isinstance(geometry, dict) else lambda key: getattr(geometry, key)
    kh, kw = get("kernel")
    return channel_modes(get("in_channels")), kh * kw, tuple(reversed(channel_modes(get("out_channels"))))


def _sizes(geometry: Geometry | LayerInfo) -> tuple[int, ...]:
    ins, spatial, outs = mode_sizes(geometry)
    return (*ins, spatial, *outs)


def kernel_tensor(weight: torch.Tensor, geometry: Geometry | LayerInfo) -> torch.Tensor:
    """The kernel ``(out, in, kh, kw)`` as the tensor ``(n_1..n_d, s, m_1..m_e)``."""
    ins, spatial, outs = mode_sizes(geometry)
    d, e = len(ins), len(outs)
    t = weight.reshape(*outs, *reversed(ins), spatial)
    order = [e + d - 1 - k for k in range(d)] + [e + d] + list(range(e))
    return t.permute(order).contiguous()


def tensor_kernel(tensor: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """The inverse of :func:`kernel_tensor`."""
    ins, _, outs = mode_sizes(geometry)
    d, e = len(ins), len(outs)
    order = [e + d - 1 - k for k in range(d)] + [e + d] + list(range(e))
    inverse = sorted(range(len(order)), key=order.__getitem__)
    t = tensor.reshape(*ins, -1, *outs).permute(inverse)
    return t.reshape(geometry["out_channels"], geometry["in_channels"], *geometry["kernel"])


def unfoldings(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The sequential unfoldings ``(n_1 .. n_k) x (n_{k+1} .. n_D)``, ``k = 1 .. D - 1``."""
    return [tensor.reshape(math.prod(tensor.shape[:k]), -1) for k in range(1, tensor.dim())]


def train_full_ranks(sizes: Sequence[int]) -> tuple[int, ...]:
    """The ranks of the sequential unfoldings: where TT-SVD is exact."""
    return tuple(min(math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, len(sizes)))


# ------------------------------------------------------------------------------------------ SVD sweep


def truncate(
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``U[:, :rank]`` and ``(S V^T)[:rank]`` of a thin SVD, padded with zeros beyond its rank."""
    u, s, vh = svd
    left, right = u[:, :rank], s[:rank, None] * vh[:rank]
    missing = rank - left.shape[1]
    if missing > 0:
        left = torch.cat([left, left.new_zeros(left.shape[0], missing)], 1)
        right = torch.cat([right, right.new_zeros(missing, right.shape[1])], 0)
    return left, right


def svd_sweep(
    tensor: torch.Tensor,
    ranks: Sequence[int],
    first: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """TT-SVD of ``tensor`` of shape ``(left, n_1, ..., n_D, right)``: cores ``(r_{k-1}, n_k, r_k)``.

    Args:
        tensor: The tensor; its first and last axes are the chain's boundary ranks.
        ranks: ``r_1 .. r_{D-1}``.
        first: The SVD of the first unfolding ``(left * n_1) x rest``, if already computed.
    """
    sizes = tensor.shape[1:-1]
    if len(ranks) != len(sizes) - 1:
        raise DecompositionError(f"{len(ranks)} ranks for a chain of {len(sizes)} cores")
    cores, previous, rest = [], tensor.shape[0], tensor
    for k, (n, r) in enumerate(zip(sizes[:-1], ranks, strict=True)):
        matrix = rest.reshape(previous * n, -1)
        left, rest = truncate(first if k == 0 and first is not None else thin_svd(matrix), r)
        cores.append(left.reshape(previous, n, r))
        previous = r
    cores.append(rest.reshape(previous, sizes[-1], tensor.shape[-1]))
    return cores


def chain_tensor(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensor ``trace(Z_1 ... Z_D)`` a chain of cores stands for (shape ``(n_1, ..., n_D)``)."""
    ring = cores[0].shape[0]
    acc = cores[0]
    for core in cores[1:]:
        acc = (acc.reshape(ring, -1, core.shape[0]) @ core.reshape(core.shape[0], -1)).reshape(
            ring, -1, core.shape[-1]
        )
    return acc.diagonal(dim1=0, dim2=2).sum(-1).reshape([c.shape[1] for c in cores])


def memoized(
    store: dict, ranks: tuple[int, ...], compute: Callable[[], list[torch.Tensor]]
) -> list[torch.Tensor]:
    """``compute()`` memoized per ranks in ``store["memo"]`` (the :data:`MEMO_SIZE` latest kept)."""
    memo: OrderedDict[tuple[int, ...], list[torch.Tensor]] = store.setdefault("memo", OrderedDict())
    if ranks in memo:
        memo.move_to_end(ranks)
    else:
        memo[ranks] = compute()
        while len(memo) > MEMO_SIZE:
            memo.popitem(last=False)
    return memo[ranks]


# ------------------------------------------------------------------------------------------ modules


class SharedConv(nn.Conv2d):
    """A convolution ``cin -> cout`` applied to each of ``copies`` channel groups with one weight.

    Its ``weight`` is ``(cout, cin, kh, kw)``; ``in_channels``, ``out_channels`` and ``groups`` are
    those of the grouped convolution it runs (``copies * cin``, ``copies * cout``, ``copies``), so
    MAC counters see what is computed. A bias, if any, has one entry per output channel.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        copies: int,
        conv: Geometry | None = None,
        bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        conv = conv or {"kernel": (1, 1), "stride": (1, 1), "padding": (0, 0), "dilation": (1, 1)}
        kernel, stride, padding, dilation = conv["kernel"], conv["stride"], conv["padding"], conv["dilation"]
        super().__init__(
            copies * cin,
            copies * cout,
            kernel,
            stride,
            padding,
            dilation,
            groups=copies,
            bias=bias,
            device="meta",
        )
        self.weight = nn.Parameter(torch.empty(cout, cin, *self.kernel_size, device=device))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if bias:
            self.bias = nn.Parameter(torch.zeros(copies * cout, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.groups == 1 else self.weight.repeat(self.groups, 1, 1, 1)
        return self._conv_forward(x, weight, self.bias)


def _swap_groups(x: torch.Tensor, outer: int, inner: int) -> torch.Tensor:
    """Reorder channels ``(outer, inner, rest)`` as ``(inner, outer, rest)`` (a copy, unless trivial)."""
    if outer == 1 or inner == 1:
        return x
    b, c, h, w = x.shape
    return x.reshape(b, outer, inner, c // (outer * inner), h, w).transpose(1, 2).reshape(b, c, h, w)


class TensorNetworkConv(FactorizedLayer):
    """A convolution or a linear layer as a chain of cores (ring rank ``ring``, bond ranks ``bonds``);
    see the module docstring.

    Children, all :class:`SharedConv`: ``in1 .. in{d}`` (1x1), ``core`` (k x k; 1x1 for a 1x1
    convolution or a linear layer), ``out1 .. out{e}`` (1x1, the last with the bias). ``linear``:
    whether it replaces a linear layer (inputs ``(..., in)``, outputs ``(..., out)``).
    """

    def __init__(
        self,
        conv: Geometry,
        ring: int,
        bonds: tuple[int, ...],
        ranks: tuple[int, ...],
        device: torch.device | str | None = None,
    ) -> None:
        if conv["kind"] not in ("conv", "linear"):
            raise DecompositionError(f"{self.method} factorizes convolutions and linear layers only")
        ins, _, outs = mode_sizes(conv)
        d, e = len(ins), len(outs)
        if len(bonds) != d + e:
            raise DecompositionError(
                f"{self.method} needs {d + e} bond ranks for this layer, got {len(bonds)}"
            )
        g, cin, cout = ring, conv["in_channels"], conv["out_channels"]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["in1"] = SharedConv(ins[0], g * bonds[0], cin // ins[0], device=device)
        for k in range(1, d):
            copies = g * math.prod(ins[k + 1 :])
            layers[f"in{k + 1}"] = SharedConv(ins[k] * bonds[k - 1], bonds[k], copies, device=device)
        layers["core"] = SharedConv(bonds[d - 1], bonds[d], g, conv, device=device)
        for j in range(e - 1):
            copies = g * math.prod(outs[:j])
            layers[f"out{j + 1}"] = SharedConv(
                bonds[d + j], outs[j] * bonds[d + j + 1], copies, device=device
            )
        layers[f"out{e}"] = SharedConv(
            g * bonds[-1], outs[-1], cout // outs[-1], bias=conv["bias"], device=device
        )
        super().__init__(layers, ranks)
        self.in_modes, self.out_modes, self.ring, self.bonds = ins, outs, ring, tuple(bonds)
        self.in_channels, self.out_channels = cin, cout
        self.linear = conv["kind"] == "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear:
            lead = x.shape[:-1]
            y = self._chain(x.reshape(-1, self.in_channels, 1, 1))
            return y.reshape(*lead, self.out_channels)
        return self._chain(x)

    def _chain(self, x: torch.Tensor) -> torch.Tensor:
        layers, g = list(self.children()), self.ring
        y = layers[0](x)  # channels (n_d .. n_2, g, r_1)
        y = _swap_groups(y, self.in_channels // self.in_modes[0], g)  # the ring index goes first
        for layer in layers[1:-1]:
            y = layer(y)
        made = self.out_channels // self.out_modes[-1]
        return layers[-1](_swap_groups(y, g, made))  # ... and last but one before the last core

    def dense_geometry(self) -> Geometry:
        bias = self[-1].bias is not None
        if self.linear:
            return linear_geometry(self.in_channels, self.out_channels, bias)
        return conv_geometry(self.core, self.in_channels, self.out_channels, bias)

    def cores(self) -> list[torch.Tensor]:
        """The chain's cores ``(r_{k-1}, size_k, r_k)`` from the children's weights."""
        d = len(self.in_modes)
        weights = [
            child.weight if k == d else child.weight.flatten(1) for k, child in enumerate(self.children())
        ]
        return weights_to_cores(weights, _sizes(self.dense_geometry()), d, self.ring)

    def effective_weight(self) -> torch.Tensor:
        kernel = tensor_kernel(chain_tensor(self.cores()), self.dense_geometry())
        return kernel[:, :, 0, 0] if self.linear else kernel


def cores_to_weights(cores: Sequence[torch.Tensor], d: int, kernel: tuple[int, int]) -> list[torch.Tensor]:
    """The children's weights of a :class:`TensorNetworkConv` from its cores (``d`` input cores)."""
    last = len(cores) - 1
    weights = []
    for k, z in enumerate(cores):
        r_in, n, r_out = z.shape
        if k == 0:  # n_1 -> (ring, r_1)
            weights.append(z.permute(0, 2, 1).reshape(r_in * r_out, n))
        elif k < d:  # (n_k, r_{k-1}) -> r_k
            weights.append(z.permute(2, 1, 0).reshape(r_out, n * r_in))
        elif k == d:  # the spatial core
            weights.append(z.permute(2, 0, 1).reshape(r_out, r_in, *kernel))
        elif k < last:  # R -> (m_j, R')
            weights.append(z.permute(1, 2, 0).reshape(n * r_out, r_in))
        else:  # (ring, R) -> m_e
            weights.append(z.permute(1, 2, 0).reshape(n, r_out * r_in))
    return [(w if w.dim() == 4 else w[:, :, None, None]).contiguous() for w in weights]


def weights_to_cores(
    weights: Sequence[torch.Tensor], sizes: Sequence[int], d: int, ring: int
) -> list[torch.Tensor]:
    """The cores from the children's weights, the 1x1 ones flattened (``sizes``: the tensor's modes)."""
    last = len(weights) - 1
    cores = []
    for k, (w, n) in enumerate(zip(weights, sizes, strict=True)):
        if k == 0:
            cores.append(w.reshape(ring, -1, n).permute(0, 2, 1))
        elif k < d:
            cores.append(w.reshape(w.shape[0], n, -1).permute(2, 1, 0))
        elif k == d:
            cores.append(w.flatten(2).permute(1, 2, 0))
        elif k < last:
            cores.append(w.reshape(n, -1, w.shape[1]).permute(2, 0, 1))
        else:
            cores.append(w.reshape(n, ring, -1).permute(2, 0, 1))
    return cores


# ------------------------------------------------------------------------------------------ costs


def _checked_modes(layer: LayerInfo, bonds: Sequence[int]) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
    """:func:`mode_sizes` of ``layer``, after checking that ``bonds`` has one rank per inner bond."""
    ins, spatial, outs = mode_sizes(layer)
    if len(bonds) != len(ins) + len(outs):
        raise DecompositionError(
            f"{len(ins) + len(outs)} bond ranks expected for layer {layer.name}, got {len(bonds)}"
        )
    return ins, spatial, outs


def chain_macs(layer: LayerInfo, ring: int, bonds: Sequence[int]) -> int:
    """MACs of :class:`TensorNetworkConv` for ``layer`` (one input); the formula of the module docstring."""
    ins, spatial, outs = _checked_modes(layer, bonds)
    d, e = len(ins), len(outs)
    hw_in, hw_out = math.prod(layer.in_hw), math.prod(layer.out_hw)
    total = hw_in * layer.in_channels * ring * bonds[0]
    for k in range(1, d):
        total += hw_in * ring * math.prod(ins[k + 1 :]) * ins[k] * bonds[k - 1] * bonds[k]
    total += hw_out * ring * bonds[d - 1] * bonds[d] * spatial
    for j in range(e - 1):
        total += hw_out * ring * math.prod(outs[:j]) * bonds[d + j] * outs[j] * bonds[d + j + 1]
    return total + hw_out * layer.out_channels * ring * bonds[-1]


def chain_params(layer: LayerInfo, ring: int, bonds: Sequence[int]) -> int:
    """Parameters of :class:`TensorNetworkConv` for ``layer``: the cores' sizes plus the bias."""
    ins, spatial, outs = _checked_modes(layer, bonds)
    ranks = (ring, *bonds, ring)
    weights = sum(ranks[k] * size * ranks[k + 1] for k, size in enumerate((*ins, spatial, *outs)))
    return weights + (layer.out_channels if layer.bias else 0)
