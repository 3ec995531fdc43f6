"""Checkpoint and resume: a resumed run ends where an uninterrupted one does, under another layout (DCP
reshards).

Every layout of tests/layouts.py RING is trained once for the session with checkpoints every 2 steps
(`trained`); here a copy of it loses everything after step RESUME_STEP and is resumed by another
layout. Every layout saves once here; every layout loads once here or where noted in PAIRS. A resume
costs a process start-up per rank, so none is repeated.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from tests.layouts import CHECKPOINT_EVERY, KEEP_CHECKPOINTS, RING, runs_in_one_process
from tests.util import (
    NUMERICS_STEPS,
    assert_same_training,
    losses,
    run_moectl,
    run_moectl_in_process,
    val_losses,
)

PAIRS = [
    ("single", "ddp"),
    ("ddp", "fsdp"),
    ("fsdp", "ep"),
    ("ep", "ep_fsdp"),
    ("ep_fsdp", "mixed"),
    ("mixed", "single"),
    # tp keeps gate_up_proj's rows permuted ([gate_r; up_r] per rank); straight to `single`, the layout
    # with no DTensor at all, shows its checkpoint holds HF's order. tp loads in
    # tests/test_run_settings.py (AdamW's moments from ep 4).
    ("tp", "single"),
]
assert {saver for saver, _ in PAIRS} == set(RING) and {loader for _, loader in PAIRS} | {"tp"} == set(RING)
RESUME_STEP = NUMERICS_STEPS // 2  # half the steps before the checkpoint, half after


def rewind(trained_run: Path, copy: Path, step: int) -> Path:
    """A copy of a finished run as a kill right after checkpoint `step` would leave it: later
    checkpoints, the model and the summary gone, and the debris of a save killed half-way."""
    shutil.copytree(trained_run, copy)
    for checkpoint in (copy / "checkpoints").glob("step_*"):
        if int(checkpoint.name.split("_")[1]) > step:
            shutil.rmtree(checkpoint)
    shutil.rmtree(copy / "model")
    (copy / "summary.json").unlink()
    # Resume must ignore both: a newer step directory without its COMPLETE marker and a half-written
    # staging directory.
    for name in (f"step_{NUMERICS_STEPS + 91:06d}", f".step_{NUMERICS_STEPS + 92:06d}.partial"):
        decoy = copy / "checkpoints" / name
        decoy.mkdir(parents=True)
        (decoy / ".metadata").write_bytes(b"not a checkpoint")
    return copy


def resume(run: Path, layout: list[str], steps: int = NUMERICS_STEPS):
    args = ["train", "--resume", str(run), *layout, "--steps", str(steps)]
    return run_moectl_in_process(*args) if runs_in_one_process(layout) else run_moectl(*args)


@pytest.mark.parametrize(("saved_by", "resumed_by"), PAIRS, ids=[f"{a}-to-{b}" for a, b in PAIRS])
def test_resume_under_another_layout_matches_single(
    tmp_path, trained, single_reference, saved_by, resumed_by
):
    run = rewind(trained(saved_by), tmp_path / "run", RESUME_STEP)
    result = resume(run, RING[resumed_by])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (
        f"resumed at step {RESUME_STEP} of {NUMERICS_STEPS}" in result.stdout
    )  # from the complete checkpoint
    assert (
        len(losses(run)) == NUMERICS_STEPS
    )  # the metrics of steps after the checkpoint were redone, not doubled
    assert_same_training(run, single_reference)
    saved_config = (run / "config.yaml").read_text()
    assert f"strategy: {RING[resumed_by][1]}" in saved_config  # the run now records its new layout


def test_a_run_killed_and_resumed_on_packed_data_is_byte_identical(tmp_path, trained):
    """The shared `single` run (packed chat rows with document masking, a validation loss every 4 steps)
    as a kill after its step-4 checkpoint leaves it, resumed: the model files are the same bytes, and
    every step's loss and every validation loss the same numbers (the rows are a function of the step)."""
    reference = trained("single")
    run = rewind(reference, tmp_path / "run", RESUME_STEP)
    result = resume(run, RING["single"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    files = sorted(p.name for p in (reference / "model").iterdir())
    assert files == sorted(p.name for p in (run / "model").iterdir())
    for name in files:
        assert (run / "model" / name).read_bytes() == (reference / "model" / name).read_bytes(), name
    assert losses(run) == losses(reference)
    assert val_losses(run) == val_losses(reference) and len(val_losses(run)) == 2


@pytest.mark.layouts("ddp")
def test_checkpoint_contents_are_canonical_and_pruned(trained):
    """Keys are plain HF names (no wrapper prefixes), so any strategy can load them; only the newest
    `keep_checkpoints` survive; each holds the step, the world size and every rank's RNG."""
    from torch.distributed.checkpoint import FileSystemReader

    run = trained("ddp")
    steps = sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").iterdir())
    every_save = range(CHECKPOINT_EVERY, NUMERICS_STEPS + 1, CHECKPOINT_EVERY)
    assert steps == list(every_save)[-KEEP_CHECKPOINTS:]  # the oldest were pruned
    latest = run / "checkpoints" / f"step_{NUMERICS_STEPS:06d}"
    meta = json.loads((latest / "meta.json").read_text())
    assert meta["step"] == NUMERICS_STEPS and meta["world_size"] == 2 and meta["strategy"] == "ddp"
    assert (latest / "rng_rank00000.pt").is_file() and (latest / "rng_rank00001.pt").is_file()
    assert (latest / "COMPLETE").is_file()
    keys = FileSystemReader(str(latest)).read_metadata().state_dict_metadata
    assert "model.model.layers.0.mlp.experts.gate_up_proj" in keys
    assert "model.lm_head.weight" in keys
    assert not [k for k in keys if "module." in k or "_orig_mod" in k or "_checkpoint_wrapped" in k]
    assert any(k.startswith("optimizer.state.model.layers.0.mlp.gate.weight.") for k in keys)


def checkpoint_tensors(checkpoint: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one checkpoint directory, whole, read without any process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = scratch / f"{checkpoint.parent.parent.parent.name}-{checkpoint.name}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled": single process on purpose
        dcp_to_torch_save(checkpoint, flat)
    state = torch.load(flat, weights_only=False)
    return {
        f"{part}.{key}": value
        for part in ("model", "optimizer")
        for key, value in state[part].items()
        if isinstance(value, torch.Tensor)
    }


def assert_checkpoints_hold_the_same_tensors(
    saved: Path, reference: Path, scratch: Path, tolerance: float, state_suffix: str
) -> None:
    """Weights and optimizer state stored as `single` stores them: the same keys, tensors and offsets."""
    saved_tensors, reference_tensors = (
        checkpoint_tensors(saved, scratch),
        checkpoint_tensors(reference, scratch),
    )
    assert saved_tensors.keys() == reference_tensors.keys()
    assert any(key.endswith(f"gate_up_proj.{state_suffix}") for key in saved_tensors), state_suffix
    for key, expected in reference_tensors.items():
        error = (saved_tensors[key].double() - expected.double()).norm() / expected.double().norm().clamp_min(
            1e-30
        )
        assert error <= tolerance, f"{key}: relative error {error:.3e}"


@pytest.mark.parametrize("layout", ["tp", "mixed"])
def test_checkpoint_holds_hf_layout(tmp_path, trained, single_reference, layout):
    """Weights and SGD momentum are stored in HF's layout: the same tensors, at the same offsets, as
    `single` writes after the same steps, so DCP can reshard them into any other layout. tp keeps
    gate_up_proj's rows permuted in memory; the file must not (a wrong layout is off by ~1).
    AdamW's moments: tests/test_run_settings.py."""
    step = f"checkpoints/step_{RESUME_STEP:06d}"
    assert_checkpoints_hold_the_same_tensors(
        trained(layout) / step, single_reference / step, tmp_path, 1e-5, "momentum_buffer"
    )


@pytest.mark.parametrize("first_step", [1, 0])
def test_a_resume_keeps_the_metrics_of_the_steps_its_checkpoint_holds(tmp_path, first_step):
    """Steps count from 1: a checkpoint after 2 steps keeps metrics.jsonl's steps 1 and 2. A file written
    when steps counted from 0 is renumbered; a line cut short by a kill is dropped."""
    from moectl.io.checkpoint import restore_metrics

    lines = [json.dumps({"step": step, "loss": 4.0 - step}) for step in range(first_step, first_step + 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9, "lo')
    kept = restore_metrics(tmp_path, 2, is_rank0=True)
    assert [record["step"] for record in kept] == [1, 2]
    assert [record["loss"] for record in kept] == [4.0 - first_step, 3.0 - first_step]
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert written == kept
