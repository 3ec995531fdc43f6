"""The paths a user gives, checked before anything reads them: each refusal says what the path is
(missing, a directory where a file belongs, a file where a directory belongs, unreadable) and the fix."""

from __future__ import annotations

import os
from pathlib import Path

from moectl.errors import UsageError


def _is_missing(path: Path) -> bool:
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:  # a symlink loop, a name too long: the path cannot be used either way
        return True
    return False


def require_file(path: Path, what: str, fix: str) -> Path:
    """`path` must be a readable file; `what` names it in the message (e.g. "--data"), `fix` says what to
    give instead."""
    path = Path(path)
    if _is_missing(path):
        raise UsageError(f"{what} {path} does not exist; {fix}")
    if path.is_dir():
        raise UsageError(f"{what} {path} is a directory, not a file; {fix}")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{what} {path} is not readable (permission denied); {fix}")
    return path


def require_directory(path: Path, what: str, fix: str) -> Path:
    """`path` must be a directory whose entries can be listed and read."""
    path = Path(path)
    if _is_missing(path):
        raise UsageError(f"{what} {path} does not exist; {fix}")
    if not path.is_dir():
        raise UsageError(f"{what} {path} is a file, not a directory; {fix}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UsageError(f"{what} {path} is not readable (permission denied); {fix}")
    return path
