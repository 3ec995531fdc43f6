"""What a run trains, set by flags a parallel layout must honour end to end: another `--seed`, a
`--data` token file, AdamW and tied embeddings, together, under ep 4 (each rank reads its own slice
of the file and holds two experts) and across a resume under tp (AdamW's moments and step counts
resharded), each time against `single` with the same flags.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.layouts import LAYOUT_RUN_ARGS, LAYOUTS
from tests.test_checkpoint import RESUME_STEP, assert_checkpoints_hold_the_same_tensors, resume, rewind
from tests.util import (
    NUMERICS_ARGS,
    NUMERICS_STEPS,
    assert_same_training,
    initial_weights,
    load_weights,
    losses,
    train_run,
)

SEED = 1


_settings: list[str] = []


def _settings_args(tmp_path_factory) -> list[str]:
    """The flags every run of this file shares, with its token file (written once per session)."""
    if not _settings:
        tokens = tmp_path_factory.mktemp("data") / "tokens.bin"
        rng = np.random.default_rng(0)
        # A learnable stream: a fixed walk through the vocabulary with 10 % random tokens.
        stream = (np.arange(20_000) * 37 % 128).astype(np.uint16)
        noisy = rng.random(stream.size) < 0.1
        stream[noisy] = rng.integers(0, 128, noisy.sum(), dtype=np.uint16)
        stream.tofile(tokens)
        _settings.extend(
            [
                "--seed",
                str(SEED),
                "--data",
                str(tokens),
                "--set",
                "train.optimizer=adamw",
                "--set",
                "train.lr=0.01",
                "--set",
                "model.tie_word_embeddings=true",
                *NUMERICS_ARGS,
                *LAYOUT_RUN_ARGS,
            ]
        )
    return _settings


def _ep_run(tmp_path_factory) -> Callable[[], Path]:
    run_dir = tmp_path_factory.mktemp("settings-ep4") / "run"
    args = ["--strategy", "ep", "--ep-size", "4", *_settings_args(tmp_path_factory)]
    return lambda: train_run(run_dir, *args)


def _resumed_under_tp(tmp_path_factory, ep_run: Callable[[], Path]) -> Callable[[], Path]:
    """ep 4's run from its step-4 checkpoint, finished under tp 2."""
    run_dir = tmp_path_factory.mktemp("settings-resumed") / "run"

    def resume_under_tp() -> Path:
        run = rewind(ep_run(), run_dir, RESUME_STEP)
        result = resume(run, LAYOUTS["tp"])
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert f"resumed at step {RESUME_STEP} of {NUMERICS_STEPS}" in result.stdout
        return run

    return resume_under_tp


def start_ahead(lane, request, items) -> None:
    """The two multi-process runs start on the background lane, the resume after the run it resumes."""
    factory = request.getfixturevalue("tmp_path_factory")
    lane.start_if_read(items, "ep_run", "settings-ep4", lambda: _ep_run(factory))

    def resume_job() -> Callable[[], Path]:
        return _resumed_under_tp(factory, lambda: lane.result("settings-ep4"))

    lane.start_if_read(items, "resumed_under_tp", "settings-resumed", resume_job)


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> list[str]:
    return _settings_args(tmp_path_factory)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, settings) -> Path:
    return train_run(tmp_path_factory.mktemp("settings-single") / "run", *settings, in_process=True)


@pytest.fixture(scope="module")
def ep_run(background_lane, tmp_path_factory) -> Path:
    return background_lane.result_or_run("settings-ep4", lambda: _ep_run(tmp_path_factory)())


@pytest.fixture(scope="module")
def resumed_under_tp(background_lane, tmp_path_factory, ep_run) -> Path:
    return background_lane.result_or_run(
        "settings-resumed", lambda: _resumed_under_tp(tmp_path_factory, lambda: ep_run)()
    )


def test_ep_honours_seed_data_file_adamw_and_tied_embeddings(single_run, ep_run):
    comparison = assert_same_training(ep_run, single_run)
    assert comparison.worst.update_error > 0  # two real runs, not one compared with itself


def test_the_seed_changes_what_is_trained(tmp_path, settings, single_run):
    """Without this the test above could pass with the seed ignored everywhere."""
    seed_zero = [*settings, "--seed", "0"]  # the last --seed wins
    other = train_run(tmp_path / "seed0", *seed_zero, in_process=True)
    assert losses(other)[0] != losses(single_run)[0]
    a, b = load_weights(other / "model"), load_weights(single_run / "model")
    assert not torch.allclose(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_adamw_resumes_under_another_layout(single_run, resumed_under_tp):
    """AdamW's moments and step count go through the checkpoint, resharded from ep 4 to tp 2."""
    assert len(losses(resumed_under_tp)) == NUMERICS_STEPS
    assert_same_training(resumed_under_tp, single_run)


@pytest.mark.parametrize("which", ["ep4-saved", "tp-saved"])
def test_adamw_checkpoint_holds_hf_layout(tmp_path, single_run, ep_run, resumed_under_tp, which):
    """AdamW's moments (and step) stored as `single` stores them: by ep 4 (local expert blocks) at the
    checkpoint it resumed from, and by tp (gate_up_proj rows permuted in memory) at the end."""
    run, step = (ep_run, RESUME_STEP) if which == "ep4-saved" else (resumed_under_tp, NUMERICS_STEPS)
    checkpoint = f"checkpoints/step_{step:06d}"
    # AdamW's first steps move each weight by about ±lr whatever the gradient's size, so fp32
    # reduction-order noise shows up to ~1e-5 per tensor; a wrong layout is off by ~1.
    assert_checkpoints_hold_the_same_tensors(
        run / checkpoint, single_run / checkpoint, tmp_path, 1e-4, "exp_avg_sq"
    )


def test_tied_embeddings_are_trained_and_saved_tied(single_run, ep_run):
    on_disk = load_weights(ep_run / "model")
    model = AutoModelForCausalLM.from_pretrained(ep_run / "model")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    embedding = on_disk["model.embed_tokens.weight"]
    assert torch.equal(model.lm_head.weight, embedding)
    assert "lm_head.weight" not in on_disk or torch.equal(on_disk["lm_head.weight"], embedding)
    # Trained (how exactly, as single trains it, the test above checks): moved well off its start.
    start = initial_weights(single_run)["model.embed_tokens.weight"]
    assert (embedding - start).norm() > 0.01 * start.norm()
