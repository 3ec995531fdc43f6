"""Multi-node settings from SLURM's variables, for `moectl train` run by `srun` (one task per node).

Under an `srun` step, the nodes, this node's rank and the rendezvous host follow from SLURM's
environment: `--nnodes` from SLURM_STEP_NUM_NODES (or SLURM_NNODES), `--node-rank` from this host's
place in the step's node list (SLURMD_NODENAME in SLURM_STEP_NODELIST, else SLURM_NODEID), and
`--rdzv-endpoint` from the first host of the node list (`scontrol show hostnames` where it exists, else
the compressed list parsed here, e.g. `gpu[01-04,07],cpu5`) and port MASTER_PORT, else 29500. A flag
(or `--set parallel.KEY`) given explicitly wins over its variable.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any

from moectl.errors import UsageError

DEFAULT_PORT = 29500
#: parallel keys SLURM's variables can supply
KEYS = ("nnodes", "node_rank", "rdzv_endpoint")


def parse_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list: `gpu[01-04,07],cpu5` -> gpu01 … gpu04, gpu07, cpu5.

    Ranges keep the width of their first number (`[009-011]` -> 009, 010, 011); several bracket groups
    in one name expand to every combination (`r[1-2]n[1-2]` -> r1n1, r1n2, r2n1, r2n2). Raises
    ValueError for an unbalanced bracket or a range that is not `A-B` with A <= B."""
    hosts: list[str] = []
    for name in _split_top_level(nodelist.strip()):
        hosts.extend(_expand(name, nodelist))
    if not hosts:
        raise ValueError(f"empty node list {nodelist!r}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested brackets in node list {text!r}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    if depth:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    parts.append(text[start:])
    return [part for part in parts if part]


def _expand(name: str, whole: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", name)
    if match is None:
        return [name]
    head, tail = name[: match.start()], name[match.end() :]
    values = []
    for piece in match[1].split(","):
        bounds = piece.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            values.append(bounds[0])
        elif len(bounds) == 2 and all(b.isdigit() for b in bounds) and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])
            values.extend(f"{n:0{width}d}" for n in range(int(bounds[0]), int(bounds[1]) + 1))
        else:
            raise ValueError(f"bad range {piece!r} in node list {whole!r}")
    return [expanded for value in values for expanded in _expand(f"{head}{value}{tail}", whole)]


def hostnames(nodelist: str) -> list[str]:
    """The hosts of a node list: `scontrol show hostnames` where SLURM's tools are installed (it knows
    every form SLURM writes), else `parse_nodelist`."""
    if shutil.which("scontrol"):
        try:
            result = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
            )
            hosts = result.stdout.split()
            if result.returncode == 0 and hosts:
                return hosts
        except (OSError, subprocess.TimeoutExpired):
            pass
    return parse_nodelist(nodelist)


def under_srun(environ: Mapping[str, str]) -> bool:
    """Inside a task of an `srun` step (a batch script itself has no step id)."""
    return all(key in environ for key in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_NODEID")) and bool(
        environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    )


def _tasks_per_node(spec: str) -> int:
    """The largest count of SLURM_STEP_TASKS_PER_NODE, e.g. `8(x2),4` -> 8."""
    counts = [int(count) for count in re.findall(r"(\d+)(?:\(x\d+\))?", spec)]
    return max(counts, default=1)


def slurm_layout(
    explicit: set[str] | frozenset[str], environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The parallel keys SLURM supplies under `srun` (KEYS less those in `explicit`); {} elsewhere."""
    environ = os.environ if environ is None else environ
    under_torchrun = "TORCHELASTIC_RUN_ID" in environ or ("RANK" in environ and "WORLD_SIZE" in environ)
    if not under_srun(environ) or under_torchrun:  # an outside launcher already set the world
        return {}
    tasks = environ.get("SLURM_STEP_TASKS_PER_NODE")
    if tasks and _tasks_per_node(tasks) > 1:
        raise UsageError(
            f"srun started {_tasks_per_node(tasks)} tasks on a node; moectl starts each node's workers "
            "itself: run one task per node (srun --ntasks-per-node=1) and give --nproc"
        )
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"]
    try:
        hosts = hostnames(nodelist)
    except ValueError as exc:
        raise UsageError(f"cannot read SLURM's node list ({exc}); give --rdzv-endpoint HOST:PORT") from None
    nnodes = int(environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_NNODES") or len(hosts))
    this_host = environ.get("SLURMD_NODENAME")
    node_rank = hosts.index(this_host) if hosts.count(this_host) == 1 else int(environ["SLURM_NODEID"])
    port = environ.get("MASTER_PORT") or DEFAULT_PORT
    found = {"nnodes": nnodes, "node_rank": node_rank, "rdzv_endpoint": f"{hosts[0]}:{port}"}
    return {key: value for key, value in found.items() if key not in explicit}


def default_run_dir(strategy: str, environ: Mapping[str, str] | None = None) -> str | None:
    """Under srun, the run directory every node of the step computes alike (a time-stamped name may
    differ by a second between nodes): runs/slurm-<job id>.<step id>-<strategy>; None elsewhere."""
    environ = os.environ if environ is None else environ
    if not under_srun(environ):
        return None
    step = f"{environ['SLURM_JOB_ID']}.{environ['SLURM_STEP_ID']}"
    return f"runs/slurm-{step}-{strategy.replace('/', '_').replace(':', '_')}"
