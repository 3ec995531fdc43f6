"""Shared helpers for tests: run the real CLI (in a subprocess, or in this process for one-process
runs) and compare what two runs trained, tensor by tensor."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parent.parent
#: Steps of every numerics run: enough for momentum, accumulated state and several routings to matter
#: (a bug that scales one gradient by 3 % shows within a step; one that corrupts state after a
#: resume needs steps after it). A run's cost is mostly process start-up (about 1 s per extra 8 steps).
NUMERICS_STEPS = 8
# Small, fast settings every numerics test shares (fp32 on the CPU, SGD with momentum).
NUMERICS_ARGS = [
    "--steps",
    str(NUMERICS_STEPS),
    "--global-batch",
    "8",
    "--micro-batch",
    "2",
    "--set",
    "train.timing_warmup_steps=0",
]

#: ‖A − B‖₂ / ‖B‖₂ over the whole model: the contract's bound for fp32 on the CPU (DESIGN.md).
WHOLE_MODEL_RTOL = 1e-5
#: ‖(A − w0) − (B − w0)‖₂ / ‖B − w0‖₂ for *every* tensor, w0 the initial weights: what training changed
#: must agree tensor by tensor. Measured over 8 steps of the tiny preset (fp32, CPU, gloo), every layout
#: of the suite stays below 2.9e-6 with SGD + momentum (mostly q_norm and the routers) and at 2.1e-5
#: with AdamW under ep 4 (an expert's projection; AdamW turns the reduction-order noise of small
#: gradients into a larger share of the update). The bound keeps a 5x margin over AdamW and 35x over
#: SGD, and the smallest planted fault (ep's expert gradients counted once per replica in the clipping
#: norm: 1.6e-3 on an expert) is 16x above it (BENCHMARKS.md, "Test suite time";
#: MOECTL_TEST_NUMERICS_LOG re-measures).
UPDATE_RTOL = 1e-4
#: largest |loss − reference loss| at any step
LOSS_TOL = 1e-5
#: largest |validation loss − reference's| at any evaluation: a forward pass of the same weights
VAL_LOSS_TOL = 1e-6


#: the console script `make setup` installs beside this interpreter
MOECTL_SCRIPT = Path(sys.executable).with_name("moectl")
#: the README's bench showcase (its command as printed; tests/conftest.py `readme_run` runs it once)
README_BENCH_SHOWCASE = (
    "moectl bench --strategies single,ddp,fsdp,tp,mixed,ep --nproc 4 --verify --out runs/bench1"
)


def run_as_printed(
    command: str, cwd: Path, timeout: float, environ: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """A README command line through the shell, with the installed console script first on PATH, in
    `environ` (default: this process's environment)."""
    environ = os.environ if environ is None else environ
    env = {
        **environ,
        "CUDA_VISIBLE_DEVICES": "",
        "PATH": f"{MOECTL_SCRIPT.parent}{os.pathsep}{environ['PATH']}",
        # The console script imports the checkout under test, even where the venv's editable install
        # points at another checkout (a worktree, or planted_faults.py's copy).
        "PYTHONPATH": os.pathsep.join([str(REPO), environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def run_moectl(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m moectl ARGS` in a subprocess: the console entry point, and the only way to run a
    multi-process layout."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "moectl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO,
    )


def refused_in_process(argv: list[str], capsys, *expected: str) -> str:
    """`moectl ARGV` in this process must refuse: exit 2 and one line `error: …` on stderr holding every
    `expected` text; returns that line."""
    from moectl.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def run_moectl_in_process(*args: str) -> subprocess.CompletedProcess:
    """The same CLI (`moectl.cli.main`) in this process: a one-process run without the seconds of
    interpreter and import start-up. Output and exit code are captured as a subprocess's would be."""
    from moectl.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), contextlib.chdir(REPO):
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return subprocess.CompletedProcess(["moectl", *args], code, stdout.getvalue(), stderr.getvalue())


def train_run(
    run_dir: Path, *args: str, timeout: float = 300, in_process: bool = False, keep_output: bool = False
) -> Path:
    """Run `moectl train` into run_dir and insist it succeeded. `in_process` for one-process runs;
    `keep_output` writes the console's stdout and stderr beside run_dir (`console_output`)."""
    command = ("train", "--run-dir", str(run_dir), *args)
    result = run_moectl_in_process(*command) if in_process else run_moectl(*command, timeout=timeout)
    assert result.returncode == 0, (
        f"moectl train {' '.join(args)} failed ({result.returncode}):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    if keep_output:
        run_dir.with_name(f"{run_dir.name}.stdout").write_text(result.stdout)
        run_dir.with_name(f"{run_dir.name}.stderr").write_text(result.stderr)
    return run_dir


def console_output(run_dir: Path) -> tuple[str, str]:
    """The stdout and stderr of a run made with `train_run(..., keep_output=True)`."""
    return tuple(run_dir.with_name(f"{run_dir.name}.{stream}").read_text() for stream in ("stdout", "stderr"))


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def val_losses(run_dir: Path) -> dict[int, float]:
    """Validation loss by step, of the steps that evaluated."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["val_loss"] for record in records if "val_loss" in record}


HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
#: train flags that make rank 0 write TensorBoard events too (when tensorboard is installed, as `make
#: setup` does), for the runs whose outputs `assert_outputs_complete` checks
TENSORBOARD_ARGS = ["--set", "train.tensorboard=true"] if HAS_TENSORBOARD else []


def assert_outputs_complete(
    run_dir: Path,
    steps: int,
    *,
    checkpoint: int | None,
    finished: bool,
    ranks: int = 0,
    logs_end_with: str | None = None,
) -> None:
    """What a user reads after a run ended, whichever way it ended, is whole: metrics.jsonl holds one
    complete line per finished step, and TensorBoard's events (runs made with TENSORBOARD_ARGS) the
    same losses; `checkpoint` is the newest checkpoint (None: none), complete, with no partial one
    left; summary.json and model/ exist exactly when the run `finished`; each of `ranks` launched
    workers wrote its log, down to its last line (`logs_end_with`, when given)."""
    metrics_file = run_dir / "metrics.jsonl"
    assert metrics_file.is_file() or not steps, "no metrics.jsonl"
    metrics = metrics_file.read_text() if metrics_file.is_file() else ""
    assert metrics.endswith("\n") or not metrics, f"metrics.jsonl ends mid-line: {metrics[-200:]!r}"
    records = [json.loads(line) for line in metrics.splitlines()]
    assert [record["step"] for record in records] == list(range(1, steps + 1)), metrics[-500:]

    from moectl.config import build_config

    if build_config(str(run_dir / "config.yaml")).train.tensorboard:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        accumulator = EventAccumulator(str(run_dir / "tensorboard"))
        accumulator.Reload()
        scalars = accumulator.Scalars("train/loss") if steps else []
        assert [s.step for s in scalars] == list(range(1, steps + 1)), f"TensorBoard holds steps {scalars}"
        assert [s.value for s in scalars] == pytest.approx([r["loss"] for r in records], rel=1e-6)

    root = run_dir / "checkpoints"
    saved = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    expected = [] if checkpoint is None else [f"step_{checkpoint:06d}"]
    assert saved[-1:] == expected, f"checkpoints: {saved}"
    assert all((root / name / "COMPLETE").is_file() for name in saved), f"an incomplete checkpoint: {saved}"

    assert (run_dir / "summary.json").is_file() == finished
    assert (run_dir / "model").is_dir() == finished
    if finished:
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["losses"] == [record["loss"] for record in records]

    for rank in range(ranks):
        lines = (run_dir / "logs" / f"rank{rank}.log").read_text().splitlines()
        assert lines and lines[0].startswith(f"== moectl worker rank {rank} of "), lines[:1]
        if logs_end_with is not None:
            assert lines[-1].startswith(logs_end_with), f"rank {rank}'s log ends with {lines[-1]!r}"


# ---- numerics: what two runs trained ------------------------------------------------------------
_INITIAL_WEIGHTS: dict[str, dict[str, torch.Tensor]] = {}


def initial_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights a run started from, in the layout of its saved model: the checkpoint it was given
    (`model.path`), or the seeded initialisation of its config (any preset, any seed), written once
    through the same HF saving path as every run's model."""
    from moectl.config import build_config
    from moectl.io.hf import save_hf_model
    from moectl.model.build import build_meta_model, hf_config, materialize, random_init_source

    cfg = build_config(str(run_dir / "config.yaml"))
    if cfg.model.path:
        return load_weights(Path(cfg.model.path))
    key = json.dumps([asdict(cfg.model), cfg.train.seed], sort_keys=True)
    if key not in _INITIAL_WEIGHTS:
        model = build_meta_model(cfg.model, torch.float32)
        materialize(model, torch.device("cpu"), random_init_source(cfg.model, cfg.train.seed))
        with tempfile.TemporaryDirectory() as scratch:
            save_hf_model(dict(model.state_dict()), hf_config(cfg.model), Path(scratch) / "model")
            _INITIAL_WEIGHTS[key] = load_weights(Path(scratch) / "model")
    return _INITIAL_WEIGHTS[key]


@dataclass(frozen=True)
class TensorError:
    name: str
    update_error: float  # ‖a − b‖ / ‖b − w0‖: error of what training changed
    relative_error: float  # ‖a − b‖ / ‖b‖
    update_norm: float  # ‖b − w0‖


@dataclass(frozen=True)
class TrainingComparison:
    whole_model_error: float  # ‖A − B‖ / ‖B‖ over all tensors
    whole_update_error: float  # ‖A − B‖ / ‖B − W0‖ over all tensors
    tensors: list[TensorError]  # worst update error first
    max_loss_diff: float
    max_val_loss_diff: float = 0.0  # over the evaluations (none: 0)

    @property
    def worst(self) -> TensorError:
        return self.tensors[0]

    def describe(self, rows: int = 5) -> str:
        lines = [
            f"whole model: relative error {self.whole_model_error:.3e}, update error "
            f"{self.whole_update_error:.3e}; largest step loss difference {self.max_loss_diff:.3e}, "
            f"validation loss difference {self.max_val_loss_diff:.3e}",
            "worst tensors (update error ‖a − b‖/‖b − w0‖, relative error ‖a − b‖/‖b‖, ‖b − w0‖):",
        ]
        lines += [
            f"  {t.name}: {t.update_error:.3e}  {t.relative_error:.3e}  {t.update_norm:.3e}"
            for t in self.tensors[:rows]
        ]
        return "\n".join(lines)


def compare_training(run: Path, reference: Path) -> TrainingComparison:
    """Final weights of `run` against `reference`'s, with w0 the reference's initial weights.

    Why the update and not the weights: a whole-model relative error divides by the norm of every
    weight, so a tensor that is a small share of the model (the router is 3e-4 of it) can be wrong by
    percents and still pass. What training changed, compared per tensor, has no such blind spot.
    """
    a, b = load_weights(run / "model"), load_weights(reference / "model")
    w0 = initial_weights(reference)
    assert a.keys() == b.keys(), f"key sets differ: {sorted(a.keys() ^ b.keys())[:5]}"
    assert b.keys() == w0.keys(), (
        f"the reference's keys differ from its start: {sorted(b.keys() ^ w0.keys())[:5]}"
    )
    tensors = []
    diff_sq = ref_sq = update_sq = 0.0
    for key in sorted(b):
        assert a[key].shape == b[key].shape, f"{key}: shape {tuple(a[key].shape)} != {tuple(b[key].shape)}"
        mine, theirs, start = a[key].double(), b[key].double(), w0[key].double()
        diff, norm, update = (
            (mine - theirs).norm().item(),
            theirs.norm().item(),
            (theirs - start).norm().item(),
        )
        diff_sq, ref_sq, update_sq = diff_sq + diff**2, ref_sq + norm**2, update_sq + update**2
        update_error = diff / update if update > 0 else (0.0 if diff == 0 else float("inf"))
        tensors.append(TensorError(key, update_error, diff / norm if norm > 0 else diff, update))
    tensors.sort(key=lambda t: -t.update_error)
    run_losses, ref_losses = losses(run), losses(reference)
    assert len(run_losses) == len(ref_losses), (
        f"{len(run_losses)} steps recorded, reference {len(ref_losses)}"
    )
    max_loss_diff = max(abs(x - y) for x, y in zip(run_losses, ref_losses, strict=True))
    run_val, ref_val = val_losses(run), val_losses(reference)
    assert run_val.keys() == ref_val.keys(), (
        f"evaluated at steps {sorted(run_val)}, reference {sorted(ref_val)}"
    )
    return TrainingComparison(
        whole_model_error=(diff_sq / ref_sq) ** 0.5,
        whole_update_error=(diff_sq / update_sq) ** 0.5 if update_sq else float("inf"),
        tensors=tensors,
        max_loss_diff=max_loss_diff,
        max_val_loss_diff=max((abs(run_val[s] - ref_val[s]) for s in ref_val), default=0.0),
    )


def assert_same_training(
    run: Path,
    reference: Path,
    *,
    update_rtol: float = UPDATE_RTOL,
    rtol: float = WHOLE_MODEL_RTOL,
    loss_tol: float = LOSS_TOL,
    val_loss_tol: float = VAL_LOSS_TOL,
) -> TrainingComparison:
    """The numerics contract: every tensor's update, the whole model, every step's loss and every
    validation loss agree.

    With MOECTL_TEST_NUMERICS_LOG=FILE every comparison of the run is appended to FILE (one JSON line:
    the test, the worst tensor, both errors): how the bounds above were measured.
    """
    comparison = compare_training(run, reference)
    if log := os.environ.get("MOECTL_TEST_NUMERICS_LOG"):
        record = {
            "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
            "worst_tensor": comparison.worst.name,
            "update_error": comparison.worst.update_error,
            "whole_model_error": comparison.whole_model_error,
            "max_loss_diff": comparison.max_loss_diff,
            "max_val_loss_diff": comparison.max_val_loss_diff,
        }
        with open(log, "a") as file:
            file.write(json.dumps(record) + "\n")
    problems = []
    if comparison.worst.update_error > update_rtol:
        problems.append(
            f"{comparison.worst.name}'s update differs by {comparison.worst.update_error:.3e} > {update_rtol:.0e}"
        )
    if comparison.whole_model_error > rtol:
        problems.append(f"whole-model relative error {comparison.whole_model_error:.3e} > {rtol:.0e}")
    if comparison.max_loss_diff > loss_tol:
        problems.append(f"a step's loss differs by {comparison.max_loss_diff:.3e} > {loss_tol:.0e}")
    if comparison.max_val_loss_diff > val_loss_tol:
        problems.append(
            f"a validation loss differs by {comparison.max_val_loss_diff:.3e} > {val_loss_tol:.0e}"
        )
    assert not problems, (
        f"trained differently from the reference: {'; '.join(problems)}\n{comparison.describe()}\n"
        f"run: {run}\nreference: {reference}"
    )
    return comparison
