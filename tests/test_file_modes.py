"""Every file and directory moectl writes follows the umask, as open() and mkdir() do: a run directory
shared by a team reads like any other (tempfile's 0600 / 0700 and safetensors' 0600 are not kept)."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest
from rich.console import Console

from tests.util import run_moectl_in_process


def _wrong_modes(root: Path, umask: int) -> list[str]:
    wrong = []
    for path in [root, *sorted(root.rglob("*"))]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != expected:
            wrong.append(f"{path.relative_to(root.parent)}: {oct(mode)}, expected {oct(expected)}")
    return wrong


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    saved = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_a_run_directory_follows_the_umask(mask, umask, tmp_path):
    """Every kind of output: config, metrics, summary, plots, the model, expert load and router bias,
    checkpoints, TensorBoard events and the profile."""
    run_dir = tmp_path / "run"
    umask(mask)
    result = run_moectl_in_process(
        "train", "--run-dir", str(run_dir), "--steps", "2", "--global-batch", "8", "--micro-batch", "2",
        "--checkpoint-every", "1", "--set", "train.router_bias_update=0.001", "--set",
        "train.timing_warmup_steps=0", "--set", "train.profile_steps=1",
        *(["--set", "train.tensorboard=true"] if _has("tensorboard") else []),
    )  # fmt: skip
    umask(0o022)
    assert result.returncode == 0, result.stderr[-3000:]
    written = {path.name for path in run_dir.iterdir()}
    assert {"model", "checkpoints", "router_bias.safetensors", "expert_load.safetensors"} <= written
    if _has("matplotlib"):
        assert {"loss.png", "expert_load.png"} <= written
    assert _wrong_modes(run_dir, mask) == []


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_bench_and_compare_outputs_follow_the_umask(mask, umask, tmp_path):
    from moectl.bench.report import write_plot
    from moectl.io.outputs import write_json_atomic

    umask(mask)
    write_json_atomic(tmp_path / "out" / "report.json", {"matched": True})
    if _has("matplotlib"):
        row = {"name": "ddp", "status": "ok", "tokens_per_s_per_device": 1.0, "mfu": None, "mfu_seed": None,
               "loss_curve": [{"step": 1, "loss": 2.0}]}  # fmt: skip
        payload = {"rows": [row], "verify": {"reference_run": None}}
        assert write_plot(payload, tmp_path / "out" / "bench.png", Console(file=io.StringIO()))
    umask(0o022)
    assert _wrong_modes(tmp_path / "out", mask) == []


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
