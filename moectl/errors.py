"""What can end a command early, and the environment check the CLI needs before anything heavy.

Nothing here imports torch or transformers: `moectl --help` and usage errors must answer without them.
"""

from __future__ import annotations

import os


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, nothing written."""


class TrainingStopped(Exception):
    """The run ended early on purpose; `exit_code` and a one-line message, never a traceback."""

    exit_code = 1
    label = "error"


class WorkerFailed(RuntimeError):
    """A launched worker failed or the launch was stopped; one line and the job's exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
        self.label = "interrupted" if exit_code > 128 else "error"


def under_torchrun() -> bool:
    """True inside a worker started by an elastic agent (ours or an outside torchrun)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)
