"""The launcher: a dead worker ends the job with a clear message and exit code 1, the last complete
checkpoint resumes to the very weights of a run never interrupted, outside torchrun works, every
rank's log lands in the run directory, multi-node rendezvous. (Bad worlds and plugin files are in the
bad-input catalogue, tests/test_bad_inputs.py.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from moectl.run.worker import _lost_a_peer, import_capturing_output
from tests.util import (
    NUMERICS_ARGS,
    NUMERICS_STEPS,
    REPO,
    TENSORBOARD_ARGS,
    assert_outputs_complete,
    assert_same_training,
    losses,
    run_moectl,
    train_run,
)

COLLECTIVE_TIMEOUT_S = 60
KILLED_AT_STEP = 3

# A plugin strategy: DDP whose rank 1 kills itself (SIGKILL, no clean-up, no message) in step 3, after
# the checkpoint of step 2, writing the wall-clock time of the kill next to this file first.
KILLER_PLUGIN = f"""
import os, signal, time
from pathlib import Path

import torch.distributed as dist

from strategies.ddp import DDP


class KillRankOneInStepThree(DDP):
    name = "kill-rank-one"
    steps_done = 0

    def after_backward(self, model):
        super().after_backward(model)
        self.steps_done += 1
        if dist.get_rank() == 1 and self.steps_done == {KILLED_AT_STEP}:
            Path(__file__).with_suffix(".killed").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", **extra}


def test_dead_worker_ends_the_job_and_its_checkpoint_resumes(tmp_path, single_reference, layout_data):
    """A SIGKILLed rank ends the job fast with exit code 1, naming rank 1, the logs and the resume
    command; every rank logged to the run directory, and the steps before the kill are complete in
    metrics, TensorBoard events and the checkpoint; the last complete checkpoint resumes (on one
    process: the layout may change) and the run ends with the weights of one never interrupted."""
    plugin = tmp_path / "killer.py"
    plugin.write_text(KILLER_PLUGIN)
    run_dir = tmp_path / "run"
    scratch = tmp_path / "tmp"  # the launcher's temporary files (its worker server's socket) go here
    scratch.mkdir()
    flags = ["--nproc", "2", "--checkpoint-every", "2", "--set", f"parallel.timeout_s={COLLECTIVE_TIMEOUT_S}"]
    flags += TENSORBOARD_ARGS
    result = run_moectl(
        "train",
        "--strategy",
        str(plugin),
        "--run-dir",
        str(run_dir),
        *flags,
        *NUMERICS_ARGS,
        *layout_data,
        env={"TMPDIR": str(scratch)},
    )
    ended = time.time()
    assert plugin.with_suffix(".killed").exists(), f"rank 1 never reached step 3:\n{result.stderr[-3000:]}"
    killed = float(plugin.with_suffix(".killed").read_text())

    assert result.returncode == 1, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: worker rank 1 was killed by signal SIGKILL"), last_line
    assert str(run_dir / "logs" / "rank1.log") in last_line
    assert f"--resume {run_dir}" in last_line, last_line
    # The agent notices the dead process itself: no waiting for the collective timeout.
    assert ended - killed < COLLECTIVE_TIMEOUT_S / 2, f"job took {ended - killed:.1f} s to end after the kill"
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["launcher.log", "rank0.log", "rank1.log"]
    assert f"step {KILLED_AT_STEP - 1}:" in (run_dir / "logs" / "rank0.log").read_text()
    assert list(scratch.iterdir()) == [], "the launcher left temporary files"
    done = KILLED_AT_STEP - 1
    assert_outputs_complete(run_dir, done, checkpoint=done, finished=False, ranks=2)
    resume = ["--resume", str(run_dir), "--strategy", "single", "--nproc", "1"]
    train_run(run_dir, *resume, in_process=True)  # --run-dir equal to --resume is fine
    assert len(losses(run_dir)) == NUMERICS_STEPS  # metrics of the step redone after the checkpoint: once
    assert_same_training(run_dir, single_reference)


def test_runs_under_an_outside_torchrun(tmp_path, single_reference, layout_data):
    """(b): `torchrun ... -m moectl train` trains in the workers torchrun started, same weights as single;
    its workers leave without interpreter finalization, and everything they wrote is complete."""
    run_dir = tmp_path / "torchrun"
    torchrun = f"-m torch.distributed.run --nproc-per-node 2 --rdzv-endpoint 127.0.0.1:{_free_port()}"
    moectl = f"-m moectl train --strategy ddp --run-dir {run_dir} --checkpoint-every {NUMERICS_STEPS}"
    result = subprocess.run(
        [sys.executable, *torchrun.split(), *moectl.split(), *NUMERICS_ARGS, *layout_data, *TENSORBOARD_ARGS],
        capture_output=True,
        text=True,
        timeout=300,
        env=_subprocess_env(),
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: run directory") == 1  # printed by rank 0 only
    assert not (run_dir / "logs").exists()  # torchrun owns the workers' output, not moectl
    assert_outputs_complete(run_dir, NUMERICS_STEPS, checkpoint=NUMERICS_STEPS, finished=True)
    assert_same_training(run_dir, single_reference)


def test_two_nodes_on_localhost_train_like_single(tmp_path, single_reference, layout_data):
    """Two launchers rendezvous on localhost as two nodes of an `srun` step, and share one run directory:
    node 1 takes the nodes, its node rank and the rendezvous host from SLURM's variables alone (the
    compressed node list parsed, the port from MASTER_PORT); node 0 gives --nnodes and --rdzv-endpoint
    itself, which win over its variables (they name port 29500). Node 0 (global rank 0) writes the
    model and metrics, node 1 only its config and logs under node1/."""
    run_dir = tmp_path / "two-nodes"
    port = _free_port()
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_NNODES": "2",
        "SLURM_STEP_NODELIST": "127.0.0.[1-2]",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    }
    flags = {
        0: ["--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}"],
        1: [],
    }
    # Both "nodes" share this machine's cores: one thread per worker, as on a real node split.
    env = {
        0: _subprocess_env(OMP_NUM_THREADS="1", SLURM_NODEID="0", **slurm),
        1: _subprocess_env(OMP_NUM_THREADS="1", SLURM_NODEID="1", MASTER_PORT=str(port), **slurm),
    }
    common = ["--strategy", "ddp", "--nproc", "1", "--run-dir", str(run_dir), *NUMERICS_ARGS, *layout_data]
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "moectl", "train", *common, *flags[rank]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env[rank],
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
    saved = (run_dir / "node1" / "config.yaml").read_text()
    assert f"rdzv_endpoint: 127.0.0.1:{port}" in saved and "node_rank: 1" in saved and "nnodes: 2" in saved


# A launcher that forks one worker from multiprocessing's fork server, as moectl's does; the worker
# watches it (moectl.run.worker.stop_when_the_launcher_ends) and notes the SIGINT it then gets.
WATCHED_WORKER = """
import multiprocessing, os, signal, sys, time
from pathlib import Path

from moectl.run.worker import stop_when_the_launcher_ends


def work(note):
    signal.signal(signal.SIGINT, lambda *_: (Path(note).write_text(str(os.getppid())), sys.exit(130)))
    stop_when_the_launcher_ends()
    time.sleep(60)


if __name__ == "__main__":
    worker = multiprocessing.get_context("forkserver").Process(target=work, args=(sys.argv[1],))
    worker.start()
    print(worker.pid, flush=True)
    time.sleep(60)
"""


def test_a_forked_worker_stops_when_its_launcher_is_killed(tmp_path):
    """A launcher killed by SIGKILL forwards no signal, and a forked worker's parent, the fork server,
    lives on while the worker does: the worker watches the launcher and stops as on Ctrl-C."""
    script, note = tmp_path / "launcher.py", tmp_path / "stopped"
    script.write_text(WATCHED_WORKER)
    launcher = subprocess.Popen(
        [sys.executable, str(script), str(note)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        worker = int(launcher.stdout.readline())
        assert not note.exists()
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 30
        while not note.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert note.exists(), "the worker was not stopped"
        assert int(note.read_text()) != launcher.pid  # forked from the server, not the launcher
        while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{worker}"), "the worker outlived its stop"
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_the_worker_servers_import_output_is_kept_for_the_rank_logs(capfd, monkeypatch):
    """What the worker server's imports print (through Python's streams, as warnings do, or straight to
    the file descriptors, as C code does; a failed import's traceback) is kept for the workers' logs,
    never shown on the launcher's console."""
    # Python's streams on file descriptors 1 and 2, as in the server (pytest's own capture bypasses them).
    monkeypatch.setattr(sys, "stdout", open(1, "w", closefd=False))  # noqa: SIM115
    monkeypatch.setattr(sys, "stderr", open(2, "w", closefd=False))  # noqa: SIM115

    def noisy_imports():
        print("printed by Python")
        print("UserWarning: an import-time warning", file=sys.stderr)
        os.write(1, b"written to fd 1\n")
        os.write(2, b"written to fd 2\n")
        raise ImportError("a module that fails to import")

    kept = import_capturing_output(noisy_imports).decode()
    for text in ("printed by Python", "an import-time warning", "written to fd 1", "written to fd 2"):
        assert text in kept, kept
    assert "ImportError: a module that fails to import" in kept
    console = capfd.readouterr()
    assert (console.out, console.err) == ("", "")


@pytest.mark.parametrize(
    ("error", "lost_a_peer"),
    [
        (
            RuntimeError(
                "[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"
            ),
            True,
        ),
        (dist.DistBackendError("NCCL error: remote process exited or there was a network error"), True),
        (dist.DistNetworkError("failed to recv, got 0 bytes"), True),
        (RuntimeError("rank one exploded on purpose"), False),
        (ValueError("a bug of the worker's own"), False),
    ],
)
def test_only_a_worker_that_lost_a_peer_waits_to_be_stopped(error, lost_a_peer):
    """A worker whose collective failed stays up so the agent reports the rank that failed first (the
    dead-worker tests above and in test_console check the whole story); its own errors end it at once."""
    assert _lost_a_peer(error) is lost_a_peer
