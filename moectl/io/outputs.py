"""Run directories and atomic writes: a file is complete under its final name, or absent."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from moectl.errors import UsageError


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only set it,
    and setting it back and forth races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def follow_umask(path: Path) -> None:
    """Give `path` (a directory: with everything under it) the permissions that open() and mkdir() give
    under the umask: 0666 / 0777 less the umask. tempfile makes 0600 files and 0700 directories, and
    safetensors writes 0600 files; a run directory shared by a team must read like every other file."""
    umask = current_umask()
    path = Path(path)
    if path.is_dir():
        for root, directories, files in os.walk(path):
            for name in directories:
                os.chmod(os.path.join(root, name), 0o777 & ~umask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~umask)
        os.chmod(path, 0o777 & ~umask)
    else:
        os.chmod(path, 0o666 & ~umask)


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file beside `path` and `os.replace`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        follow_umask(Path(temp_name))
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def save_figure_atomic(figure, path: Path) -> None:
    """A matplotlib figure as PNG, written the way `write_text_atomic` writes text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(handle)
    try:
        figure.savefig(temp_name, format="png", dpi=110)
        follow_umask(Path(temp_name))
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def default_run_dir(strategy: str) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{strategy.replace('/', '_').replace(':', '_')}"


def check_writable(directory: Path, flag: str = "--run-dir") -> None:
    """Create and remove a scratch file: the only test that also sees read-only mounts, ACLs and
    root's bypass of permission bits (os.access says yes to root even on a chmod 555 directory)."""
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory; pick a writable {flag}")
    try:
        handle, name = tempfile.mkstemp(prefix=".moectl-write-test-", dir=directory)
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        raise UsageError(f"cannot write under {directory} ({exc.strerror}); pick a writable {flag}") from None


def check_output_dir(directory: Path, flag: str = "--run-dir") -> None:
    """Refuse, before any work starts, an output directory that is a file or not empty, or whose
    nearest existing parent cannot be written (`flag` names it in the message)."""
    if directory.is_file():
        raise UsageError(
            f"{flag} {directory} is a file; give a directory that does not exist yet or is empty"
        )
    if directory.is_dir() and any(directory.iterdir()):
        raise UsageError(f"{flag} {directory} already exists and is not empty; pick another {flag}")
    parent = directory
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    check_writable(parent, flag)


def check_run_dir_writable(run_dir: Path) -> None:
    """`--run-dir`: absent or empty, under a writable directory."""
    check_output_dir(run_dir, "--run-dir")


def create_run_dir(run_dir: Path, config_yaml: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", config_yaml)
