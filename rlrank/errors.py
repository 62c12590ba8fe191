"""The one error hierarchy of rlrank.

Every error that rlrank raises on purpose derives from :class:`RlrankError`. Two branches tell the
commands what to do with it:

* :class:`UserError`: the input cannot work (an option, a file, a model, a budget). The commands
  print its message as one line and exit with code 2, before anything is written.
* :class:`RunFailure`: a run that started went wrong (every episode failed, a loss became NaN).
  The commands print one line and exit with code 1; the run folder can be resumed.

Modules define their specific errors as subclasses of these (``ModelError(UserError)``, ...), so a
caller can catch one kind or all of them.
"""

from __future__ import annotations


class RlrankError(Exception):
    """Base class of every error rlrank raises on purpose."""


class UserError(RlrankError, ValueError):
    """Bad input: an option, file, model, data set or budget that cannot work (exit code 2)."""


class RunFailure(RlrankError, RuntimeError):
    """A run that started could not go on (exit code 1).

    Attributes:
        run_dir: The run folder (set by the pipeline).
        resumable: Whether ``--resume`` can finish the run once the cause is fixed.
    """

    run_dir: str | None = None
    resumable: bool = True


class ConfigError(UserError):
    """An option value that cannot work."""


class SearchError(RunFailure):
    """A search that cannot go on (every episode failed): its options must change, so a new run is
    needed."""

    resumable = False


class StorageError(RunFailure):
    """A file of the run could not be written (a full disk, a folder that went read-only)."""


class Interrupted(RlrankError):
    """The user interrupted a run (Ctrl-C); it can be resumed from its run folder (exit code 130).

    Attributes:
        run_dir: The run folder, or ``None`` when none was created yet.
    """

    def __init__(self, run_dir: str | None) -> None:
        where = f"continue with --resume {run_dir}" if run_dir else "no run folder was created yet"
        super().__init__(f"interrupted; {where}")
        self.run_dir = run_dir
