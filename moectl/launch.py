"""Starting workers through torch.distributed's elastic launcher (the machinery behind torchrun).

The agent watches its workers: when one dies, it stops the rest and raises, so a crashed rank ends
the job with a non-zero code instead of leaving peers blocked in a collective.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from pathlib import Path

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from moectl.config import ParallelConfig

# Never let NCCL use NVLink multicast (NVLS): on shared hosts it can take the GPUs out of service.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class WorkerFailed(RuntimeError):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_workers(parallel: ParallelConfig, nproc_per_node: int, config_path: Path, run_dir: Path) -> None:
    """Run `python -m moectl.worker` on nproc_per_node local processes; rank 0's output on the console."""
    for key, value in SAFE_ENV.items():
        os.environ.setdefault(key, value)
    endpoint = parallel.rdzv_endpoint or f"127.0.0.1:{_free_port()}"
    logs = DefaultLogsSpecs(
        log_dir=str(run_dir / "logs"), redirects=Std.ALL, tee=Std.ALL, local_ranks_filter={0}
    )
    multi_node = parallel.nnodes > 1
    config = LaunchConfig(
        min_nodes=parallel.nnodes,
        max_nodes=parallel.nnodes,
        nproc_per_node=nproc_per_node,
        run_id=os.environ.get("MOECTL_RUN_ID", "moectl" if multi_node else uuid.uuid4().hex[:8]),
        # Several nodes: the static rendezvous honours --node-rank (global ranks node_rank × nproc + local
        # rank; node 0 hosts the store), so global rank 0, which writes the model, runs on node 0. The
        # c10d rendezvous ignores a node rank and orders nodes by their host/pid descriptors.
        rdzv_backend="static" if multi_node else "c10d",
        rdzv_endpoint=endpoint,
        rdzv_configs={"rank": parallel.node_rank} if multi_node else {},
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
        logs_specs=logs,
    )
    try:
        elastic_launch(config, sys.executable)("-u", "-m", "moectl.worker", str(config_path), str(run_dir))
    except ChildFailedError as exc:
        rank, failure = _first_failure(exc)
        codes = {f.exitcode for f in exc.failures.values()}
        exit_code = 2 if codes == {2} else 1
        how = (
            f"was killed by signal {failure.signal_name()}"
            if failure.exitcode < 0
            else f"exited with code {failure.exitcode}"
        )
        detail = _last_error_line(run_dir, failure.local_rank)
        raise WorkerFailed(
            f"worker rank {rank} {how}{': ' + detail if detail else ''}; all logs under {run_dir / 'logs'}",
            exit_code,
        ) from None


def _first_failure(exc: ChildFailedError) -> tuple[int, ProcessFailure]:
    """The worker that failed first: the root cause, not a peer the agent then stopped with SIGTERM.

    Timestamps have one-second resolution; the agent records failures in the order it saw them
    (the first before it terminates the rest), so that order breaks ties. Keys are global ranks.
    """
    in_order = list(exc.failures.items())
    first = min(range(len(in_order)), key=lambda index: (in_order[index][1].timestamp, index))
    return in_order[first]


def _last_error_line(run_dir: Path, local_rank: int) -> str:
    """The last line of the failed worker's stderr, which names the exception.

    Log folders are named by *local* rank (this node's workers), not by global rank.
    """
    for path in sorted((run_dir / "logs").glob(f"**/attempt_*/{local_rank}/stderr.log")):
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        for line in reversed(lines):
            if not line.startswith(("File ", "^", "~")) and "Traceback" not in line:
                return line[:300]
    return ""
