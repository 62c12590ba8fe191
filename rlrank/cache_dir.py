"""Where rlrank keeps what it computes once per machine: extracted archives, decoded images,
latency tables."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(override: str | Path | None = None) -> Path:
    """``override`` if given, else ``$RLRANK_CACHE``, else ``~/.cache/rlrank``."""
    if override:
        return Path(override)
    return Path(os.environ.get("RLRANK_CACHE", Path.home() / ".cache" / "rlrank"))
