"""Faults: stop signals end a run cleanly with a checkpoint; non-finite numbers stop it (or skip the
step) with the step number; non-finite weights are never written as the final model."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.layouts import LAYOUTS, runs_in_one_process, world_size
from tests.util import (
    NUMERICS_ARGS,
    REPO,
    TENSORBOARD_ARGS,
    assert_outputs_complete,
    assert_same_training,
    load_weights,
    losses,
    run_moectl,
    run_moectl_in_process,
    train_run,
)

DIVERGING = [*NUMERICS_ARGS, "--lr", "1e6"]  # fp32 weights blow up within a few SGD steps


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _latest_step(run: Path) -> int:
    done = [p for p in (run / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file()]
    return max(int(p.name.split("_")[1]) for p in done)


@pytest.mark.parametrize(
    ("layout", "sig"),
    [("ddp", signal.SIGTERM), ("single", signal.SIGINT)],
    ids=["ddp-SIGTERM", "single-SIGINT"],
)
def test_stop_signal_finishes_the_step_and_checkpoints(tmp_path, layout, sig):
    """The signal goes to the moectl parent only (as `kill` or Ctrl-C would); under ddp the elastic
    agent forwards it to the workers, which agree on a step, checkpoint together and exit. Both
    signals go through the same handler. Metrics, TensorBoard events, every rank's log and the
    checkpoint are complete after the exit."""
    run = tmp_path / "run"
    parent = subprocess.Popen(
        [sys.executable, "-m", "moectl", "train", "--run-dir", str(run), *NUMERICS_ARGS, *LAYOUTS[layout]]
        + ["--steps", "1000", *TENSORBOARD_ARGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    metrics = run / "metrics.jsonl"
    try:
        wait_for(
            lambda: (metrics.is_file() and metrics.read_text().count("\n") >= 1) or parent.poll() is not None,
            180,
            "the first step",
        )
        assert parent.poll() is None, parent.communicate()[1][-3000:]
        parent.send_signal(sig)
        started = time.monotonic()
        _, stderr = parent.communicate(timeout=120)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 128 + sig, stderr[-3000:]
    assert time.monotonic() - started < 60
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("interrupted: ") and f"stopped by {sig.name}" in message, message
    assert f"--resume {run}" in message, message
    steps_done = _latest_step(run)
    assert steps_done == len(losses(run))  # every finished step is in the checkpoint
    assert_outputs_complete(
        run,
        steps_done,
        checkpoint=steps_done,
        finished=False,
        ranks=world_size(LAYOUTS[layout]) if layout != "single" else 0,
        logs_end_with=f"interrupted: stopped by {sig.name} after step {steps_done}",
    )
    # The checkpoint loads and training goes on (on one process: the layout may change).
    resume = ["--resume", str(run), "--strategy", "single", "--nproc", "1", "--steps", str(steps_done + 1)]
    train_run(run, *resume, in_process=True)
    assert len(losses(run)) == steps_done + 1


def _stop_at_a_nonfinite_step(run: Path, layout: list[str]) -> int:
    """Train `layout` with a learning rate that blows up: exit 3, one line naming the step, nothing
    of the bad step applied, no model written, the last good state checkpointed, and what the steps
    before it wrote complete (metrics, TensorBoard events, every rank's log). Returns the step."""
    args = ["train", "--run-dir", str(run), *layout, *DIVERGING, "--steps", "6", "--checkpoint-every", "5"]
    in_process = runs_in_one_process(layout)
    result = run_moectl_in_process(*args) if in_process else run_moectl(*args, *TENSORBOARD_ARGS)
    assert result.returncode == 3, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    match = re.search(r"not finite at step (\d+)|loss is \w+ at step (\d+)", message)
    assert message.startswith("error: ") and match, message
    assert "--resume" in message, message
    bad_step = int(match[1] or match[2])
    assert len(losses(run)) == bad_step - 1  # the bad step was not applied
    assert _latest_step(run) == bad_step - 1  # the state before the bad step was checkpointed
    assert_outputs_complete(
        run,
        bad_step - 1,
        checkpoint=bad_step - 1,
        finished=False,
        ranks=0 if in_process else world_size(layout),
        logs_end_with=f"error: {message.partition(': ')[2].split(';')[0]}",
    )
    return bad_step


@pytest.mark.parametrize("layout", ["tp", "ep", "fsdp"])
def test_nonfinite_stops_every_layout_with_the_step(tmp_path, layout):
    """Gradients as DTensors (tp, fsdp) or plain local expert blocks (ep): every rank agrees to stop."""
    _stop_at_a_nonfinite_step(tmp_path / "run", LAYOUTS[layout])


def test_nonfinite_stop_keeps_the_last_good_state_to_resume_from(tmp_path):
    run = tmp_path / "run"
    bad_step = _stop_at_a_nonfinite_step(run, LAYOUTS["single"])
    # The checkpoint loads: a resume that skips bad steps ends with a finite model.
    args = ["--resume", str(run), "--set", "train.on_nonfinite=skip", "--steps", str(bad_step)]
    train_run(run, *args, in_process=True)
    assert len(losses(run)) == bad_step - 1
    assert all(torch.isfinite(t).all() for t in load_weights(run / "model").values())


def test_nonfinite_skip_leaves_the_weights_of_the_good_steps(tmp_path):
    skipped = tmp_path / "skip"
    result = run_moectl_in_process(
        "train", "--run-dir", str(skipped), *DIVERGING, "--steps", "5", "--set", "train.on_nonfinite=skip"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    num_good = len(losses(skipped))
    assert 0 < num_good < 5 and result.stdout.count("step skipped") == 5 - num_good
    # Skipped steps change nothing: the result is the run that stopped after the good steps.
    good_only = train_run(tmp_path / "good", *DIVERGING, "--steps", str(num_good), in_process=True)
    assert_same_training(skipped, good_only, update_rtol=1e-6, rtol=1e-6, loss_tol=1e-6)
    assert all(torch.isfinite(t).all() for t in load_weights(skipped / "model").values())


def test_save_outputs_refuses_nonfinite_weights(tmp_path):
    from moectl.config import build_config
    from moectl.model.build import build_meta_model, materialize, random_init_source
    from moectl.parallel.dims import ParallelDims
    from moectl.run.faults import NonFiniteLoss
    from moectl.run.loop import Summary, save_outputs
    from strategies.single import Single

    cfg = build_config("tiny")
    model = build_meta_model(cfg.model, torch.float32)
    materialize(model, torch.device("cpu"), random_init_source(cfg.model, 0))
    with torch.no_grad():
        model.lm_head.weight[3, 5] = float("nan")
    summary = Summary("single", 1, 1, 0, 1, 1.0, 1.0, 1.0, None, None, 1.0, 0.0, 1.0)
    with pytest.raises(NonFiniteLoss, match="lm_head.weight"):
        save_outputs(cfg, Single(ParallelDims(1), cfg.model), model, tmp_path, summary, is_rank0=True)
    assert list(tmp_path.iterdir()) == []


def test_grad_check_and_stop_signals_in_process():
    from moectl.run.faults import StopSignals, agree_on_step

    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    handler_before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        assert agree_on_step(model, stop, torch.device("cpu")) == (False, False)
        os.kill(os.getpid(), signal.SIGINT)  # handled: recorded, no KeyboardInterrupt
        model.bias.grad[0] = float("inf")
        assert agree_on_step(model, stop, torch.device("cpu")) == (True, True)
        with pytest.raises(KeyboardInterrupt):  # a second signal aborts at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is handler_before
