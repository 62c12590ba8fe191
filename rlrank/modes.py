"""Leaving a model exactly as it was found: every submodule's train / eval flag.

``model.train(was_training)`` restores only the root's flag and sets every submodule to it, so a
BatchNorm that a user froze in eval mode inside a train-mode model would come back in train mode.
:func:`preserved_modes` records each module's own flag and puts it back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def preserved_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Run the body (which may call ``model.eval()`` or ``model.train()``), then restore every
    submodule's ``training`` flag as it was."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
