"""Entry point of one worker process started by the elastic launcher (`run`, forked by the launcher's
worker server, see moectl.run.launch).

A worker writes out its output as it returns (`moectl.run.runtime.flush_output`); a forked worker then
leaves through multiprocessing's own exit, which skips interpreter finalization (where gloo groups
still held by torch's caches can abort a finished process, see
`moectl.run.runtime.exit_without_finalization`). The run's own files are closed by the loop before.

Every rank writes its stdout and stderr (tracebacks, warnings, C-level output) to
`RUN_DIR/logs/rank<k>.log`; global rank 0 also keeps the console for its progress. What the worker
server's imports printed (import-time warnings) is written there too.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

# Never let NCCL use NVLink multicast (NVLS): on shared hosts it can take the GPUs out of service.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

#: lines a rank log holds that are progress, not errors: the header below, rank 0's step lines and its
#: notes on the data it reads
PROGRESS_LINE = re.compile(r"(== moectl worker rank |step \d+: |resumed at step |data: |validation: )")


def rank_log_path(run_dir: Path, rank: int) -> Path:
    """Where a launched worker of global rank `rank` writes its output (the launcher reads it back)."""
    return run_dir / "logs" / f"rank{rank}.log"


def redirect_output_to_log(run_dir: Path, rank: int) -> TextIO | None:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to its rank log.

    Returns a stream on the original stdout for global rank 0 (the console its progress goes to),
    None for the others. The log is opened for appending: a resumed run adds to it, under a header.
    """
    path = rank_log_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    console = None
    if rank == 0:
        console = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8", errors="replace")
    sys.stdout.flush()
    sys.stderr.flush()
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    # A forked worker inherits block-buffered streams: line buffering keeps the log current for a
    # rank that is killed.
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    world = os.environ.get("WORLD_SIZE", "?")
    print(f"== moectl worker rank {rank} of {world}, pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    return console


def import_capturing_output(import_modules: Callable[[], None]) -> bytes:
    """Run `import_modules` with file descriptors 1 and 2 sent to a buffer; return what it printed
    (the worker server's imports, `moectl.run.worker_imports`).

    An import that fails is printed there too and otherwise ignored: each worker imports again and
    reports the error in its own log.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 1)
        os.dup2(capture.fileno(), 2)
        try:
            import_modules()
        except Exception:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)
        capture.seek(0)
        return capture.read()


#: How long a worker whose collective failed stays up before it exits. The agent reports the first
#: worker it sees end (it checks every 0.2 s): the rank that crashed or was killed, not the peers that
#: lost it a moment later. The agent stops the waiting peers itself, so nothing waits this long but a
#: node whose failed peer sits on another node.
PEER_FAILURE_GRACE_S = 3.0


def run(config_path: str, run_dir: str) -> None:
    """The elastic launcher's entry point: return on success, leave with the exit code otherwise.

    The launcher's agent reads a worker's success from its return (it waits for every rank's); any
    other outcome is the process's exit code, with the traceback of an unexpected error in the log.
    """
    try:
        code = main(config_path, run_dir)
    except BaseException as exc:
        traceback.print_exc()
        code = 1
        if _lost_a_peer(exc):
            _wait_to_be_stopped(PEER_FAILURE_GRACE_S)
    from moectl.run.runtime import flush_output

    flush_output()
    if code:
        sys.exit(code)


def _lost_a_peer(exc: BaseException) -> bool:
    """A collective failed: a peer died or hung (gloo raises RuntimeErrors from its transport, NCCL
    and the store torch.distributed's errors)."""
    import torch.distributed as dist

    return isinstance(exc, dist.DistError) or isinstance(exc, RuntimeError) and "gloo/transport" in str(exc)


def _wait_to_be_stopped(seconds: float) -> None:
    """Sleep, ended at once by the agent's SIGTERM (or a Ctrl-C): the signals' default actions again."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    time.sleep(seconds)


def stop_when_the_launcher_ends() -> None:
    """Stop this worker as a Ctrl-C does (it finishes its step, checkpoints and exits) once its launcher
    has ended without stopping it, e.g. killed by SIGKILL.

    A spawned worker is the launcher's child and gets torch's parent-death signal (SIGINT) for this; a
    forked one is the worker server's child, and the server lives on while any worker runs. Both
    watch the launcher through multiprocessing's pipe to the process that started them.
    """
    launcher = multiprocessing.parent_process()
    if launcher is None or launcher.pid == os.getppid():
        return

    def watch() -> None:
        launcher.join()
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()


def main(config_path: str, run_dir: str) -> int:
    console = redirect_output_to_log(Path(run_dir), int(os.environ.get("RANK", "0")))
    stop_when_the_launcher_ends()
    server_imports = sys.modules.get("moectl.run.worker_imports")  # forked from the worker server
    if server_imports is not None and server_imports.OUTPUT:
        sys.stderr.write(server_imports.OUTPUT.decode(errors="replace"))

    import torch.distributed as dist

    from moectl.config import build_config
    from moectl.errors import UsageError
    from moectl.plan.predict import run_prediction
    from moectl.registry import build_strategy
    from moectl.run import report, runtime
    from moectl.run.faults import TrainingStopped
    from moectl.run.loop import run_training

    if console is not None:
        report.set_console_stream(console)
    cfg = build_config(config_path)
    device = runtime.pick_device(cfg.train)
    runtime.init_process_group(device, cfg.parallel.timeout_s)
    try:
        strategy = build_strategy(cfg, runtime.world_size())
        run_training(cfg, strategy, Path(run_dir), run_prediction(cfg, strategy))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:  # a clean, agreed stop: the message is the whole story
        print(f"{exc.label}: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
