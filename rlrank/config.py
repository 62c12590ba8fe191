"""The resolved configuration of one search: every command-line option, declared once, as a field.

Each field carries its ``--help`` text, group and value type (:func:`rlrank.options.option`);
``rlrank-search``'s parser is generated from them. Defaults are sized for the embedded default
(ResNet-18 on scikit-learn's 8x8 digits), so that ``python -m rlrank.search --model resnet18 --flops
0.5`` finishes in minutes on a laptop CPU. For real data sets raise ``episodes``, ``warmup``,
``finetune_steps`` and the epoch counts. This module imports no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from rlrank.options import (
    count,
    epochs,
    fraction,
    fractions,
    globs,
    non_negative_float,
    option,
    positive,
    positive_float,
    seed_number,
    size_or_fraction,
    sparse_fraction,
    weight,
    widths,
)

MODEL_AND_DATA = "model and data"
BUDGET = "budget and decomposition"
SEARCH = "search"
REWARD = "reward: the cheap fine-tune of every episode"
TRAINING = "training"
ADMM = "low-rank-aware training (ADMM)"
STAGES = "multi-stage compression"
POLICY = "policy reuse"
PARALLEL = "parallel episodes (Ray)"
RUN = "run"


@dataclass
class SearchConfig:
    """Everything a search needs; written to ``config.json`` in the run folder.

    Attributes are grouped as on the command line: model and data, budget and decomposition,
    search, reward (cheap fine-tune), training, multi-stage, policy reuse, run; each field's
    metadata holds its ``--help`` text.
    """

    # model and data
    model: str = option(
        "resnet18",
        group=MODEL_AND_DATA,
        choices="rlrank.models:list_models",
        metavar="NAME",
        help="architecture: {choices}",
    )
    dataset: str = option(
        "digits",
        group=MODEL_AND_DATA,
        choices="rlrank.data:DATASETS",
        help="digits (embedded, offline), cifar10 or imagefolder",
    )
    data_dir: str | None = option(
        None,
        group=MODEL_AND_DATA,
        help="data folder (cifar10: torchvision's files; imagefolder: DIR/train, DIR/test, or a .tar.gz of them)",
    )
    download: bool = option(False, group=MODEL_AND_DATA, help="download CIFAR-10 if missing (needs internet)")
    loading: str = option(
        "auto",
        group=MODEL_AND_DATA,
        choices="rlrank.data:LOADINGS",
        help="imagefolder: 'memory' decodes every image once (cached per machine), 'stream' reads batches "
        "from disk with DataLoader workers, 'auto' streams when the decoded images pass 4 GiB",
    )
    image_size: int | None = option(
        None,
        group=MODEL_AND_DATA,
        type=positive,
        metavar="PIXELS",
        help="imagefolder: fit every image to this side (scaled to cover it, centre-cropped; "
        "default: the first training image's size)",
    )
    loader_workers: int | None = option(
        None,
        group=MODEL_AND_DATA,
        type=count,
        metavar="N",
        help="processes decoding a streamed imagefolder (default: none on 1-2 CPU cores, else cores - 1, "
        "at most 8)",
    )
    val_size: float | None = option(
        None,
        group=MODEL_AND_DATA,
        type=size_or_fraction,
        help="validation images held out of train: a fraction (<1) or a count, at least one per class "
        "(default: 0.2 for digits, 5000 otherwise)",
    )
    split_seed: int = option(
        0,
        group=MODEL_AND_DATA,
        type=seed_number,
        help="seed of the train/val split, kept apart from --seed so that runs with several seeds "
        "share one held-out set",
    )
    checkpoint: str | None = option(
        None,
        group=MODEL_AND_DATA,
        metavar="PATH",
        help="trained weights: a state dict or {'state_dict': ...}, 'module.' prefix allowed",
    )
    pretrained: bool = option(
        False, group=MODEL_AND_DATA, help="start from published weights (needs internet)"
    )
    # budget and decomposition
    flops: float = option(
        0.5, group=BUDGET, type=fraction, help="keep at most this fraction of the dense model's MACs"
    )
    decomposition: str = option(
        "tucker2",
        group=BUDGET,
        choices="rlrank.planning:list_decompositions",
        help="factorization of kxk convs; 1x1 convs and linear layers use SVD (tt and tr factorize them too); "
        "prune: channel pruning; mixed: per residual block the agent chooses pruning or tucker2",
    )
    hooi_iters: int = option(
        0,
        group=BUDGET,
        type=count,
        help="HOOI (alternating least squares) sweeps refining each Tucker-2 truncation after the "
        "truncated HOSVD; each costs SVDs per layer and strategy, so 0 (plain truncation) is the fast choice",
    )
    data_aware: bool = option(
        False,
        group=BUDGET,
        help="fit each layer's output factor to its responses on training images, not to its weights alone",
    )
    data_aware_batches: int = option(
        8,
        group=BUDGET,
        type=positive,
        help="training batches observed for --data-aware and for channel pruning's selection and refit",
    )
    exclude: list[str] | None = option(
        None,
        group=BUDGET,
        type=globs,
        metavar="GLOBS",
        help="layers left as they are, by name or shell-style pattern, comma-separated "
        "(e.g. 'conv1,layer1.*'; --dry-run lists the names)",
    )
    sparse: float = option(
        0.0,
        group=BUDGET,
        type=sparse_fraction,
        metavar="F",
        help="sparse + low-rank layers: every factorized layer spends the fraction F of its cost at its "
        "ratio on whole dense filters (those its low-rank part misses most), the low-rank part the rest, "
        "so W ~ L + S within the same FLOP budget; 0 = low-rank only",
    )
    latency_budget: float | None = option(
        None,
        group=BUDGET,
        flag="--latency",
        type=fraction,
        metavar="F",
        help="keep at most this fraction of the dense model's latency on the run's device, enforced every "
        "episode like --flops (without --flops: the only budget); priced from a per-layer table timed "
        "once per model and device (cached); a layer whose factorized form is not faster stays dense",
    )
    latency_batch: int = option(
        64, group=BUDGET, type=positive, metavar="B", help="batch size at which --latency is timed"
    )
    min_ratio: float = option(
        0.05,
        group=BUDGET,
        type=fraction,
        help="smallest rank ratio an episode may give a layer (ranks = ratio x full rank, at least 1); "
        "it also bounds the smallest reachable budget",
    )
    fill_budget: bool = option(
        True,
        group=BUDGET,
        help="let episodes leave budget unused (AMC's single action wall); by default a lower wall "
        "makes every episode spend its whole budget",
    )
    action_space: str = option(
        "relative",
        group=BUDGET,
        choices=("relative", "absolute"),
        help="relative: an action scales the ratio that would share the budget left evenly "
        "(0 = uniform); absolute: AMC's linear map onto [min-ratio, 1]",
    )
    reserve: float = option(
        0.5,
        group=BUDGET,
        type=weight,
        help="with --action-space relative: the action wall keeps every later layer at least this "
        "fraction of its ratio in the center strategy, so early overspending cannot squeeze the last "
        "layers to --min-ratio (0: AMC's wall, later layers only at --min-ratio)",
    )
    action_center: str = option(
        "alds",
        group=BUDGET,
        choices=("uniform", "energy", "vbmf", "alds"),
        help="with --action-space relative (ignored with absolute): the strategy that action 0 plays, "
        "the uniform one or a rule's, rescaled to the budget left at each step (alds: the best rule "
        "measured on CIFAR-10)",
    )
    # search
    agent: str = option(
        "ddpg",
        group=SEARCH,
        choices="rlrank.agents.registry:list_agents",
        help="ddpg, random search, surrogate (model-based search), or a rule: uniform, energy, vbmf, alds",
    )
    episodes: int = option(100, group=SEARCH, type=count, help="episodes (reward evaluations) per stage")
    warmup: int = option(
        25, group=SEARCH, type=count, help="warm-up episodes of random actions (ddpg, surrogate)"
    )
    spread: float = option(
        0.25,
        group=SEARCH,
        type=fraction,
        help="random actions (random search, DDPG and surrogate warm-up; the surrogate's candidates) are uniform in [-S, S]",
    )
    start_at_center: bool = option(
        True,
        group=SEARCH,
        help="with relative actions, episode 0 of ddpg and random search plays the center strategy "
        "(action 0: uniform or --action-center's rule), so a search never ends below it; this turns that off",
    )
    noise: float = option(
        0.125,
        group=SEARCH,
        type=non_negative_float,
        help="initial std of DDPG's exploration noise after warm-up, in AMC's units (a fraction of the "
        "action range; 0.5 = half of it)",
    )
    noise_decay: float = option(0.95, group=SEARCH, type=fraction, help="per-episode noise decay")
    credit: str = option(
        "copy",
        group=SEARCH,
        choices=("copy", "bootstrap"),
        help="how DDPG credits the per-layer actions with the one reward at the episode's end: copy it "
        "to every step (AMC; with gamma 1 that is each step's return) or bootstrap from the next "
        "step's value (plain TD)",
    )
    critics: int = option(
        1,
        group=SEARCH,
        type=positive,
        help="DDPG critics fitted to the same episodes; with more than one the actor maximises their "
        "minimum, so it moves only where they agree (1: AMC)",
    )
    hidden: list[int] = option(
        default_factory=lambda: [300, 300],
        group=SEARCH,
        type=widths,
        metavar="W,W",
        help="hidden layer widths of DDPG's actor and of each critic, comma-separated (AMC's)",
    )
    reward: str = option(
        "acc", group=SEARCH, choices="rlrank.envs:REWARDS", help="acc, or AMC's -error*log(FLOPs)"
    )
    # reward: the cheap fine-tune
    finetune_steps: int = option(
        0,
        group=REWARD,
        type=count,
        help="SGD steps after BN re-estimation (0: BN re-estimation only, the most faithful reward measured)",
    )
    finetune_lr: float = option(
        0.01,
        group=REWARD,
        type=positive_float,
        help="constant learning rate of the cheap fine-tune's SGD steps",
    )
    finetune_batch_size: int = option(
        128,
        group=REWARD,
        type=positive,
        help="training images per BN re-estimation batch and SGD step of the cheap fine-tune",
    )
    bn_batches: int = option(4, group=REWARD, type=count, help="batches re-estimating BatchNorm statistics")
    reward_val_images: int = option(
        1000, group=REWARD, type=count, help="validation images per reward (0: all of the split)"
    )
    # training: dense model (when no checkpoint) and final fine-tune
    dense_epochs: float = option(
        10.0,
        resume_safe=True,
        group=TRAINING,
        type=epochs,
        help="epochs training the dense model when no --checkpoint",
    )
    dense_lr: float = option(
        0.05,
        resume_safe=True,
        group=TRAINING,
        type=positive_float,
        help="peak learning rate (one-cycle schedule) training the dense model",
    )
    final_epochs: float | None = option(
        None,
        resume_safe=True,
        group=TRAINING,
        type=epochs,
        help="fine-tune epochs of the final compressed model (default: from the training set's size, "
        "about 540,000 images' worth between 1 and 12 epochs: 12 for CIFAR-10 and digits, 1 for "
        "ImageNet; the run's config.json records the number)",
    )
    final_lr: float = option(
        0.01,
        resume_safe=True,
        group=TRAINING,
        type=positive_float,
        help="peak learning rate (one-cycle schedule) of the stage and final fine-tunes",
    )
    batch_size: int = option(
        64,
        group=TRAINING,
        type=positive,
        help="images per step of dense training, the stage and final fine-tunes, BatchNorm "
        "re-estimation and --data-aware",
    )
    distill: float = option(
        0.5,
        resume_safe=True,
        group=TRAINING,
        type=weight,
        help="weight of distillation from the dense model in the stage and final fine-tunes, 0 = off; "
        "on by default since it measurably helps (experiments/RESULTS.md)",
    )
    # low-rank-aware training
    admm_epochs: float = option(
        0.0,
        resume_safe=True,
        group=ADMM,
        type=epochs,
        help="after the search, train the model this many epochs with ADMM toward the chosen ranks, "
        "then decompose it (the decomposition then loses little) and fine-tune; 0 = off",
    )
    admm_rho: float = option(
        1e-3,
        resume_safe=True,
        group=ADMM,
        type=positive_float,
        help="initial weight rho of the ADMM term, applied as a decoupled step: the fraction of the way "
        "to the rank-constrained weights each optimizer step moves a layer (at most 0.5)",
    )
    admm_rho_growth: float = option(
        3.0, resume_safe=True, group=ADMM, type=positive_float, help="factor rho grows by per ADMM epoch"
    )
    admm_updates: int = option(
        4, resume_safe=True, group=ADMM, type=positive, help="ADMM Z / U updates per epoch"
    )
    # multi-stage
    stages: int = option(1, group=STAGES, type=positive, help="search -> decompose -> fine-tune stages")
    stage_budgets: list[float] | None = option(
        None,
        group=STAGES,
        type=fractions,
        help="each stage's budget, e.g. 0.8,0.65,0.5 (default: geometric, ending at --flops)",
    )
    stage_epochs: float = option(
        2.0,
        resume_safe=True,
        group=STAGES,
        type=epochs,
        help="fine-tune epochs after every stage but the last",
    )
    # policy reuse
    train_budgets: list[float] | None = option(
        None,
        group=POLICY,
        type=fractions,
        help="train one DDPG policy across these budgets, cycled per episode, e.g. 0.3,0.5,0.7",
    )
    policy: str | None = option(
        None,
        group=POLICY,
        metavar="PATH",
        help="a saved policy (runs/X/stage-1/policy, or a file in it): --episodes 0 rolls it out once, "
        "N continues training",
    )
    # parallel episodes
    workers: int = option(
        0,
        resume_safe=True,
        group=PARALLEL,
        type=count,
        metavar="N",
        help="price N episodes at once on Ray workers, each holding the model, factors and data once "
        "(needs rlrank[ray]); 0 = one at a time in this process, without Ray",
    )
    ray_address: str | None = option(
        None,
        resume_safe=True,
        group=PARALLEL,
        metavar="ADDRESS",
        help="with --workers: a running Ray cluster (e.g. ray://head:10001 or auto); default: start "
        "Ray on this machine for the run",
    )
    gpus_per_worker: float = option(
        0.0,
        resume_safe=True,
        group=PARALLEL,
        type=non_negative_float,
        metavar="G",
        help="with --workers: GPUs per worker, fractions share one (0.25 = four workers per GPU); "
        "0 = workers on CPUs",
    )
    threads_per_worker: int = option(
        0,
        resume_safe=True,
        group=PARALLEL,
        type=count,
        metavar="T",
        help="with --workers: CPU threads (and Ray CPUs) per worker; 0 = this machine's cores shared "
        "out among the workers",
    )
    # run
    device: str = option("auto", resume_safe=True, group=RUN, help="auto, cpu or cuda")
    seed: int = option(
        0, group=RUN, type=seed_number, help="seed of the agent, fine-tunes and dense training"
    )
    out: str = option("runs", group=RUN, help="folder for run folders")
    name: str | None = option(
        None,
        group=RUN,
        help="name of the run folder (default: MODEL-METHOD-AGENT-flopsF[-Nstages]-TIME, e.g. "
        "resnet20-tucker2-ddpg-flops0.5-20261203-101500; a suffix is added if it exists)",
    )
    checkpoint_every: int = option(
        1, resume_safe=True, group=RUN, type=positive, help="episodes between resume checkpoints"
    )
    latency: bool = option(
        True, resume_safe=True, group=RUN, help="skip the latency measurement of the report"
    )
    threads: int = option(
        0,
        resume_safe=True,
        group=RUN,
        type=count,
        help="CPU threads of torch, 0 = torch's default (one per core); on a busy machine 1 is often "
        "fastest (OpenMP threads wait for each other)",
    )
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def center(self) -> str:
        """The action center in effect: ``action_center`` with relative actions; with absolute ones
        (AMC's mapping, no center) ``uniform``."""
        return self.action_center if self.action_space == "relative" else "uniform"

    def budgets_of_stages(self) -> list[float]:
        """Each stage's FLOP budget (relative to the dense model); the last is ``flops``.

        Default schedule: geometric, ``flops ** (k / stages)`` for stage ``k``.
        """
        if self.stage_budgets:
            return [float(b) for b in self.stage_budgets]
        return [self.flops ** ((k + 1) / self.stages) for k in range(self.stages)]
