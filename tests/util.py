"""Shared helpers for tests: run the real CLI in a subprocess and compare run directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parent.parent
# Small, fast settings every numerics test shares (fp32 on the CPU, several SGD steps).
NUMERICS_ARGS = [
    *("--steps", "3", "--global-batch", "8", "--micro-batch", "2"),
    *("--set", "train.timing_warmup_steps=0"),
]


def run_moectl(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "moectl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO,
    )


def train_run(run_dir: Path, *args: str, timeout: float = 300) -> Path:
    """Run `moectl train` into run_dir and insist it succeeded."""
    result = run_moectl("train", "--run-dir", str(run_dir), *args, timeout=timeout)
    assert result.returncode == 0, (
        f"moectl train {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return run_dir


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


def weight_rel_error(run_a: Path, run_b: Path) -> float:
    """‖A − B‖₂ / ‖B‖₂ over all tensors of two runs' final models (same keys and shapes required)."""
    a, b = load_weights(run_a / "model"), load_weights(run_b / "model")
    assert a.keys() == b.keys(), f"key sets differ: {sorted(a.keys() ^ b.keys())[:5]}"
    num = den = 0.0
    for key in b:
        assert a[key].shape == b[key].shape, key
        num += (a[key].double() - b[key].double()).pow(2).sum().item()
        den += b[key].double().pow(2).sum().item()
    return (num / den) ** 0.5


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(run: Path, reference: Path, rtol: float = 1e-5, loss_tol: float = 1e-5) -> None:
    """The numerics contract: same final weights (relative error) and the same loss at every step."""
    error = weight_rel_error(run, reference)
    assert error <= rtol, f"relative weight error {error:.3e} > {rtol:.0e}"
    run_losses, ref_losses = losses(run), losses(reference)
    assert len(run_losses) == len(ref_losses)
    worst = max(abs(x - y) for x, y in zip(run_losses, ref_losses, strict=True))
    assert worst <= loss_tol, f"loss differs by {worst:.3e} at some step"
