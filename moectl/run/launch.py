"""Starting workers through torch.distributed's elastic launcher (the machinery behind torchrun).

The agent watches its workers: when one dies, it stops the rest and raises, so a crashed rank ends
the job with a non-zero code instead of leaving peers blocked in a collective. The workers are forked
from a server process that has already imported torch and the training code (`start_worker_server`),
so none of them spends seconds importing it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import signal
import socket
import uuid
from pathlib import Path

from torch.distributed.elastic.multiprocessing import LogsDest, LogsSpecs, SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from moectl.config import ParallelConfig
from moectl.errors import WorkerFailed
from moectl.io.checkpoint import resume_hint
from moectl.run.faults import AGREED_STOP_LABEL, last_error_line
from moectl.run.worker import PROGRESS_LINE, SAFE_ENV, rank_log_path
from moectl.run.worker import run as run_worker

#: How the agent starts each worker. "forkserver": a fork of the worker server (`start_worker_server`),
#: which imported torch, transformers and the training code once; "spawn": a new interpreter that
#: imports them itself, seconds of CPU per worker, and finalizes at its exit (see
#: `moectl.run.runtime.exit_without_finalization` for what that can cost). On 2 cores the server halves a
#: 2-worker launch and cuts a 4-worker one to a third (BENCHMARKS.md, "Launch latency";
#: bench/launch_latency.py compares the two).
WORKER_START_METHOD = "forkserver"


class ConsoleLogs(LogsSpecs):
    """No redirection by the agent: each worker sends its own output to `RUN_DIR/logs/rank<k>.log`
    (moectl.run.worker), so the agent neither prefixes lines (`[default_role0]:`) nor nests folders."""

    def __init__(self, log_dir: Path):
        super().__init__(log_dir=str(log_dir))

    @property
    def root_log_dir(self) -> str:
        return str(self._root_log_dir)

    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
        ranks = range(len(envs))
        for env in envs.values():
            env["TORCHELASTIC_ERROR_FILE"] = ""
        return LogsDest(
            stdouts=dict.fromkeys(ranks, ""),  # "": the worker inherits the launcher's stream
            stderrs=dict.fromkeys(ranks, ""),
            tee_stdouts={},
            tee_stderrs={},
            error_files=dict.fromkeys(ranks, os.devnull),
        )


@contextlib.contextmanager
def _agent_log(path: Path):
    """The elastic agent's own log records go to `path`, not between rank 0's lines on the console."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [
        logging.getLogger(name)
        for name in ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")
    ]
    saved = [(logger.propagate, logger.level) for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, (propagate, level) in zip(loggers, saved, strict=True):
            logger.removeHandler(handler)
            logger.propagate, logger.level = propagate, level
        handler.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_worker_server() -> None:
    """Start the process the workers are forked from (multiprocessing's fork server), now.

    It imports what every worker needs (moectl.run.worker_imports) once, while this process starts the
    agent and the rendezvous, instead of each worker importing it again. The launcher starts it only
    for a run that passed every check: nothing is started for input that is refused. It ends by itself
    once this process and every worker forked from it have ended (multiprocessing's fork server
    watches a pipe they hold); a worker whose launcher is gone stops (`moectl.run.worker`). The
    server copies this process's environment as it starts, so the workers' environment is set
    first. Calling it again does nothing.
    """
    import multiprocessing
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["__main__", "moectl.run.worker_imports"]
    )
    forkserver.ensure_running()


def launch_workers(parallel: ParallelConfig, nproc_per_node: int, config_path: Path, run_dir: Path) -> None:
    """Run `moectl.run.worker.run` on nproc_per_node local processes; rank 0's output on the console."""
    for key, value in SAFE_ENV.items():
        os.environ.setdefault(key, value)
    if WORKER_START_METHOD == "forkserver":
        start_worker_server()
    # On SIGINT/SIGTERM the agent forwards the signal and waits this long before SIGKILL: the
    # workers finish their step and write a checkpoint (torch's default, 30 s, is short for big models).
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(parallel.timeout_s))
    endpoint = parallel.rdzv_endpoint or f"127.0.0.1:{_free_port()}"
    run_id = os.environ.get("MOECTL_RUN_ID", "moectl" if parallel.nnodes > 1 else uuid.uuid4().hex[:8])
    logs = ConsoleLogs(run_dir / "logs")
    config = LaunchConfig(
        min_nodes=parallel.nnodes,
        max_nodes=parallel.nnodes,
        nproc_per_node=nproc_per_node,
        run_id=run_id,
        # Several nodes: the static rendezvous honours --node-rank (global ranks node_rank × nproc + local
        # rank; node 0 hosts the store), so global rank 0, which writes the model, runs on node 0. The
        # c10d rendezvous ignores a node rank and orders nodes by their host/pid descriptors.
        rdzv_backend="static" if parallel.nnodes > 1 else "c10d",
        rdzv_endpoint=endpoint,
        rdzv_configs={"rank": parallel.node_rank} if parallel.nnodes > 1 else {},
        max_restarts=0,
        monitor_interval=0.2,
        start_method=WORKER_START_METHOD,
        logs_specs=logs,
    )
    if "shutdown_timeout" in {f.name for f in dataclasses.fields(LaunchConfig)}:  # torch >= 2.12
        config.shutdown_timeout = parallel.timeout_s
    try:
        with _agent_log(run_dir / "logs" / "launcher.log"):
            elastic_launch(config, run_worker)(str(config_path), str(run_dir))
    except ChildFailedError as exc:
        raise _describe_failure(exc.failures, run_dir) from None
    except SignalException as exc:
        name = signal.Signals(exc.sigval).name
        raise WorkerFailed(f"stopped by {name}; {resume_hint(run_dir)}", 128 + exc.sigval) from None


# Exit codes a worker returns on purpose after a clean stop (bad input, non-finite numbers, a stop
# signal): its message is the whole story.
CLEAN_STOP_CODES = {2, 3, 128 + signal.SIGINT, 128 + signal.SIGTERM}


def _describe_failure(failures: dict[int, ProcessFailure], run_dir: Path) -> WorkerFailed:
    """Name the rank that failed, with the last line of its log (its traceback stays there).

    The agent reports the first worker it finds ended, and that one is the cause: a peer that loses
    it in a collective stays up until the agent stops it (`moectl.run.worker.PEER_FAILURE_GRACE_S`).
    """
    rank, failure = min(failures.items())
    detail = _last_error_line(rank_log_path(run_dir, rank))
    if failure.exitcode in CLEAN_STOP_CODES and detail:
        return WorkerFailed(f"{detail.partition(': ')[2] or detail} (rank {rank})", failure.exitcode)
    if detail.startswith(f"{AGREED_STOP_LABEL}: "):  # the message names the rank at fault
        return WorkerFailed(f"{detail.partition(': ')[2]}; {resume_hint(run_dir)}", failure.exitcode)
    how = (
        f"was killed by signal {failure.signal_name()}"
        if failure.exitcode < 0
        else f"exited with code {failure.exitcode}"
    )
    return WorkerFailed(
        f"worker rank {rank} {how}{': ' + detail if detail else ''}; {resume_hint(run_dir)}; "
        f"its log: {rank_log_path(run_dir, rank)}",
        1,
    )


def _last_error_line(log: Path) -> str:
    """The last line of a rank's log that names an error (the log holds stdout and stderr)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    # torch.distributed prefixes a worker's traceback lines with "[rank<k>]: ".
    lines = [re.sub(r"^\[rank\d+\]:\s?", "", line) for line in lines]
    return last_error_line("\n".join(line for line in lines if not PROGRESS_LINE.match(line)))
