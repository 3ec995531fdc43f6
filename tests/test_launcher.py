"""The launcher: a dead worker ends the job with a clear message, outside torchrun works, bad worlds are
refused, every rank's log lands in the run directory, .py strategy plugins load, multi-node rendezvous."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from tests.util import NUMERICS_ARGS, REPO, assert_same_training, run_moectl

COLLECTIVE_TIMEOUT_S = 60

# A plugin strategy: DDP whose rank 1 kills itself (SIGKILL, no clean-up, no message) at step 2,
# after writing the wall-clock time of the kill next to this file.
KILLER_PLUGIN = """
import os, signal, time
from pathlib import Path

import torch.distributed as dist

from strategies.ddp import DDP


class KillRankOneAtStepTwo(DDP):
    name = "kill-rank-one"
    steps_done = 0

    def after_backward(self, model):
        self.steps_done += 1
        if dist.get_rank() == 1 and self.steps_done == 2:
            Path(__file__).with_suffix(".killed").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", **extra}


def test_dead_worker_ends_the_job_naming_its_rank(tmp_path):
    """(a) + (d) + (e): a SIGKILLed rank ends the job fast, names rank 1; every rank logged to the run dir."""
    plugin = tmp_path / "killer.py"
    plugin.write_text(KILLER_PLUGIN)
    run_dir = tmp_path / "run"
    flags = f"--nproc 2 --steps 5 --global-batch 8 --micro-batch 2 --set parallel.timeout_s={COLLECTIVE_TIMEOUT_S}"
    result = run_moectl("train", "--strategy", str(plugin), "--run-dir", str(run_dir), *flags.split())
    ended = time.time()
    assert plugin.with_suffix(".killed").exists(), f"rank 1 never reached step 2:\n{result.stderr[-3000:]}"
    killed = float(plugin.with_suffix(".killed").read_text())

    assert result.returncode not in (0, 2), result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: worker rank 1 was killed by signal SIGKILL"), last_line
    assert str(run_dir / "logs" / "rank1.log") in last_line
    # The agent notices the dead process itself: no waiting for the collective timeout.
    assert ended - killed < COLLECTIVE_TIMEOUT_S / 2, f"job took {ended - killed:.1f} s to end after the kill"
    assert not (run_dir / "model").exists()

    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["launcher.log", "rank0.log", "rank1.log"]
    assert "step 1:" in (run_dir / "logs" / "rank0.log").read_text()


def test_runs_under_an_outside_torchrun(tmp_path, single_reference):
    """(b): `torchrun ... -m moectl train` trains in the workers torchrun started, same weights as single."""
    run_dir = tmp_path / "torchrun"
    torchrun = f"-m torch.distributed.run --nproc-per-node 2 --rdzv-endpoint 127.0.0.1:{_free_port()}"
    moectl = f"-m moectl train --strategy ddp --run-dir {run_dir}"
    result = subprocess.run(
        [sys.executable, *torchrun.split(), *moectl.split(), *NUMERICS_ARGS],
        capture_output=True,
        text=True,
        timeout=300,
        env=_subprocess_env(),
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: run directory") == 1  # printed by rank 0 only
    assert not (run_dir / "logs").exists()  # torchrun owns the workers' output, not moectl
    assert_same_training(run_dir, single_reference)


def test_degrees_that_miss_the_world_size_are_refused(tmp_path):
    """(c): dp 4 on 2 processes: exit 2, one line naming both numbers, nothing written."""
    run_dir = tmp_path / "never"
    result = run_moectl("train", *"--strategy ddp --nproc 2 --dp-size 4 --run-dir".split(), str(run_dir))
    assert result.returncode == 2
    message = result.stderr.strip()
    assert "\n" not in message and "--dp-size 4" in message and "world size 2" in message, message
    assert not run_dir.exists()


def test_several_nodes_need_a_rendezvous_endpoint(tmp_path):
    run_dir = tmp_path / "never"
    flags = "--strategy ddp --nnodes 2 --node-rank 0 --nproc 1 --run-dir"
    result = run_moectl("train", *flags.split(), str(run_dir))
    assert result.returncode == 2
    assert "--rdzv-endpoint" in result.stderr and "\n" not in result.stderr.strip()
    assert not run_dir.exists()


def test_two_nodes_on_localhost_train_like_single(tmp_path, single_reference):
    """Two launchers (--nnodes 2, --node-rank 0/1) rendezvous on localhost and share one run directory:
    node 0 (global rank 0) writes the model and metrics, node 1 only its config and logs under node1/."""
    run_dir = tmp_path / "two-nodes"
    flags = (
        f"--strategy ddp --nnodes 2 --nproc 1 --rdzv-endpoint 127.0.0.1:{_free_port()} --run-dir {run_dir}"
    )
    # Both "nodes" share this machine's cores: one thread per worker, as on a real node split.
    env = _subprocess_env(OMP_NUM_THREADS="1")
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "moectl",
                "train",
                *flags.split(),
                *NUMERICS_ARGS,
                "--node-rank",
                str(rank),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for rank in (1, 0)  # node 1 first: it must wait for node 0's store, not fail
    ]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (_, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stderr[-3000:]
    assert_same_training(run_dir, single_reference)
    assert (run_dir / "logs" / "rank0.log").is_file(), "node 0 wrote no worker log"
    assert (run_dir / "node1" / "logs" / "rank1.log").is_file(), "node 1 wrote no worker log"
    assert sorted(p.name for p in (run_dir / "node1").iterdir()) == ["config.yaml", "logs"]


def test_missing_plugin_file_is_refused(tmp_path):
    """A .py strategy that is not there is bad input (exit 2), not a crash."""
    result = run_moectl("train", "--strategy", str(tmp_path / "missing.py"), "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 2
    assert "missing.py" in result.stderr
    assert not (tmp_path / "r").exists()
