"""Checkpoint and resume: a resumed run ends exactly where an uninterrupted one does, under the same
layout or another one (DCP reshards), and a worker killed with SIGKILL loses nothing that was
checkpointed.

Add a strategy to LAYOUTS and it is saved and resumed under itself and under its neighbour in the
list (a ring: single -> ddp -> ... -> single), so every layout is checked as both saver and loader.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from tests.util import NUMERICS_ARGS, REPO, assert_same_training, losses, run_moectl, train_run

LAYOUTS: dict[str, list[str]] = {
    "single": ["--strategy", "single"],
    "ddp": ["--strategy", "ddp", "--nproc", "2"],
    "fsdp": ["--strategy", "fsdp", "--nproc", "4"],
    "ep": ["--strategy", "ep", "--ep-size", "2"],
    "ep_fsdp": ["--strategy", "ep", "--ep-size", "2", "--nproc", "4", "--set", "parallel.fsdp=true"],
    "tp": ["--strategy", "tp", "--tp-size", "2"],
    "mixed": ["--strategy", "mixed", "--dp-size", "2", "--tp-size", "2"],
}
NAMES = list(LAYOUTS)
PAIRS = [(name, name) for name in NAMES] + [
    (NAMES[i], NAMES[(i + 1) % len(NAMES)]) for i in range(len(NAMES)) if len(NAMES) > 1
]
# tp keeps gate_up_proj's rows permuted ([gate_r; up_r] per rank); straight to `single`, the layout
# with no DTensor at all, shows its checkpoint holds HF's order.
PAIRS.append(("tp", "single"))
HALF_STEPS = 2  # the first run stops here with a checkpoint; the resume trains to NUMERICS_ARGS' 3 steps
SAME_LAYOUT_RTOL = 1e-6  # resume under the layout that saved: the same arithmetic, so (nearly) bit-exact


def _numerics_steps() -> int:
    return int(NUMERICS_ARGS[NUMERICS_ARGS.index("--steps") + 1])


@pytest.fixture(scope="module")
def half_runs(tmp_path_factory):
    """Per layout (and extra arguments), a run of HALF_STEPS steps with a checkpoint at its end
    (made once, then copied)."""
    made: dict[tuple[str, ...], Path] = {}

    def get(name: str, *extra: str) -> Path:
        if (name, *extra) not in made:
            made[(name, *extra)] = train_run(
                tmp_path_factory.mktemp(f"half-{name}") / "run",
                *LAYOUTS[name],
                *NUMERICS_ARGS,
                "--steps",
                str(HALF_STEPS),
                "--checkpoint-every",
                "1",
                "--set",
                "train.keep_checkpoints=1",
                *extra,
            )
        return made[(name, *extra)]

    return get


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, single_reference):
    """Per layout, the same training never interrupted (single's is the shared reference)."""
    made: dict[str, Path] = {"single": single_reference}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = train_run(
                tmp_path_factory.mktemp(f"full-{name}") / "run", *LAYOUTS[name], *NUMERICS_ARGS
            )
        return made[name]

    return get


def _add_decoys(run_dir: Path) -> None:
    """What a kill during a save leaves behind: a newer step directory without its COMPLETE marker
    and a half-written staging directory. Resume must ignore both."""
    for name in ("step_000099", ".step_000100.partial"):
        decoy = run_dir / "checkpoints" / name
        decoy.mkdir(parents=True)
        (decoy / ".metadata").write_bytes(b"not a checkpoint")


@pytest.mark.parametrize(("saved_by", "resumed_by"), PAIRS, ids=[f"{a}-to-{b}" for a, b in PAIRS])
def test_resume_matches_uninterrupted(
    tmp_path, half_runs, uninterrupted, single_reference, saved_by, resumed_by
):
    run = tmp_path / "run"
    shutil.copytree(half_runs(saved_by), run)
    _add_decoys(run)
    shutil.rmtree(run / "model")  # as if killed before the end
    (run / "summary.json").unlink()
    result = run_moectl(
        "train", "--resume", str(run), *LAYOUTS[resumed_by], "--steps", str(_numerics_steps())
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"resumed at step {HALF_STEPS} of" in result.stdout  # it did resume, from the complete checkpoint
    if saved_by == resumed_by:
        assert_same_training(run, uninterrupted(saved_by), rtol=SAME_LAYOUT_RTOL, loss_tol=SAME_LAYOUT_RTOL)
    assert_same_training(run, single_reference)
    saved_config = (run / "config.yaml").read_text()
    assert f"strategy: {LAYOUTS[resumed_by][1]}" in saved_config  # the run now records its new layout


def test_checkpoint_contents_are_canonical_and_pruned(half_runs):
    """Keys are plain HF names (no wrapper prefixes), so any strategy can load them; only the newest
    `keep_checkpoints` survive; each holds the step, the world size and every rank's RNG."""
    from torch.distributed.checkpoint import FileSystemReader

    run = half_runs("ddp")
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == [f"step_{HALF_STEPS:06d}"]  # step 1 was pruned (keep_checkpoints=1)
    latest = run / "checkpoints" / steps[0]
    meta = json.loads((latest / "meta.json").read_text())
    assert meta["step"] == HALF_STEPS and meta["world_size"] == 2 and meta["strategy"] == "ddp"
    assert (latest / "rng_rank00000.pt").is_file() and (latest / "rng_rank00001.pt").is_file()
    keys = FileSystemReader(str(latest)).read_metadata().state_dict_metadata
    assert "model.model.layers.0.mlp.experts.gate_up_proj" in keys
    assert "model.lm_head.weight" in keys
    assert not [k for k in keys if "module." in k or "_orig_mod" in k or "_checkpoint_wrapped" in k]
    assert any(k.startswith("optimizer.state.model.layers.0.mlp.gate.weight.") for k in keys)


def _checkpoint_tensors(run_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a run's latest checkpoint, whole, read without any process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    (latest,) = (run_dir / "checkpoints").glob("step_*")
    flat = tmp_path / f"{run_dir.parent.name}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled": single process on purpose
        dcp_to_torch_save(latest, flat)
    state = torch.load(flat, weights_only=False)
    return {
        f"{part}.{key}": value
        for part in ("model", "optimizer")
        for key, value in state[part].items()
        if isinstance(value, torch.Tensor)
    }


ADAMW = ("--set", "train.optimizer=adamw", "--set", "train.lr=0.01")


@pytest.mark.parametrize(
    ("layout", "extra"), [("tp", ()), ("mixed", ()), ("tp", ADAMW)], ids=["tp-sgd", "mixed-sgd", "tp-adamw"]
)
def test_checkpoint_holds_hf_layout(tmp_path, half_runs, layout, extra):
    """Weights and optimizer state (SGD momentum; AdamW's moments) are stored in HF's layout: the
    same tensors, at the same offsets, as `single` writes after the same steps, so DCP can reshard
    them into any other layout. tp keeps gate_up_proj's rows permuted in memory; the file must not."""
    # AdamW's first steps move each weight by about ±lr whatever the gradient's size, so fp32
    # reduction-order noise shows up to ~1.5e-5 per tensor; a wrong layout is off by ~1.
    tolerance = 1e-4 if extra == ADAMW else 1e-5
    saved = _checkpoint_tensors(half_runs(layout, *extra), tmp_path)
    reference = _checkpoint_tensors(half_runs("single", *extra), tmp_path)
    assert saved.keys() == reference.keys()
    assert any(
        key.endswith("gate_up_proj.momentum_buffer" if not extra else "gate_up_proj.exp_avg_sq")
        for key in saved
    )
    for key, expected in reference.items():
        error = (saved[key].double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)
        assert error <= tolerance, f"{key}: relative error {error:.3e}"


def _worker_pids(parent_pid: int) -> dict[int, int]:
    """rank -> pid of the elastic agent's workers (children of the moectl parent)."""
    workers = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != parent_pid:
                continue
            env = dict(
                item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item
            )
        except (OSError, IndexError, ValueError):
            continue
        if "RANK" in env:
            workers[int(env["RANK"])] = int(entry.name)
    return workers


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds workers through /proc")
def test_kill_9_worker_then_resume(tmp_path, tmp_path_factory):
    """SIGKILL of rank 1 mid-run: the job ends non-zero naming the rank, the last complete checkpoint
    loads, and the resumed run ends equal to one never interrupted."""
    run = tmp_path / "run"
    first_checkpoint = run / "checkpoints" / "step_000002" / "COMPLETE"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moectl",
            "train",
            "--run-dir",
            str(run),
            *LAYOUTS["ddp"],
            *NUMERICS_ARGS,
            "--steps",
            "1000",
            "--checkpoint-every",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    try:
        _wait_for(lambda: first_checkpoint.exists() or parent.poll() is not None, 180, "the first checkpoint")
        assert parent.poll() is None, parent.communicate()[1][-3000:]
        workers = _worker_pids(parent.pid)
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGKILL)
        started = time.monotonic()
        _, stderr = parent.communicate(timeout=120)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode not in (0, None)
    assert time.monotonic() - started < 60
    message = stderr.strip().splitlines()[-1]
    assert "rank 1" in message and "SIGKILL" in message, message
    assert "--resume" in message, message

    resumed_at = max(
        int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*") if (p / "COMPLETE").exists()
    )
    total = resumed_at + 2
    train_run(run, "--resume", str(run), "--steps", str(total))  # --run-dir equal to --resume is fine
    assert len(losses(run)) == total  # metrics of steps redone after the checkpoint were dropped, not doubled
    reference = train_run(
        tmp_path_factory.mktemp("killed-reference") / "run",
        *LAYOUTS["single"],
        *NUMERICS_ARGS,
        "--steps",
        str(total),
    )
    assert_same_training(run, reference)
