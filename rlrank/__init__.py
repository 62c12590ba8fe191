"""rlrank: compress a trained CNN to a FLOP budget with low-rank decomposition, choosing every
layer's rank with reinforcement learning."""

from rlrank.decompose import load, save

__version__ = "0.1.0"
__all__ = ["load", "save", "__version__"]
