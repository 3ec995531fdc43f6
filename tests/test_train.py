"""End-to-end behaviour of `moectl train` with the single strategy."""

import json
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from moectl.config import build_config
from moectl.hf_io import save_hf_model
from moectl.model import build_meta_model, hf_config, materialize, random_init_source
from tests.util import (
    NUMERICS_ARGS,
    assert_same_training,
    load_weights,
    losses,
    run_moectl,
    train_run,
    weight_rel_error,
)


def test_default_train_runs_and_loss_falls(tmp_path):
    """`moectl train` with no arguments: tiny preset, CPU, built-in data, loss visibly falls."""
    run = train_run(tmp_path / "default")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 40
    assert {"step", "loss", "tokens_per_s", "mfu", "mem_gib"} <= records[0].keys()
    assert records[0]["mfu"] is None  # CPU: no peak FLOP/s, reported as n/a
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["parallel"]["strategy"] == "single" and saved["train"]["steps"] == 40
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tokens_per_s"] > 0 and summary["final_loss"] == records[-1]["loss"]


def test_accumulation_equals_one_big_micro_batch(tmp_path):
    """micro-batch 1 × 4 accumulation steps trains the same weights as micro-batch 4 × 1."""
    common = ["--steps", "3", "--global-batch", "4", "--set", "train.timing_warmup_steps=0"]
    accumulated = train_run(tmp_path / "mb1", *common, "--micro-batch", "1")
    one_shot = train_run(tmp_path / "mb4", *common, "--micro-batch", "4")
    assert weight_rel_error(accumulated, one_shot) <= 1e-6
    assert max(abs(a - b) for a, b in zip(losses(accumulated), losses(one_shot), strict=True)) <= 1e-6


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile on the CPU needs a C compiler")
def test_compiled_layers_and_loss_train_the_same_model(tmp_path, single_reference):
    """train.compile=true (each decoder layer and the loss through Inductor) changes speed, not the model."""
    run = train_run(tmp_path / "compiled", *NUMERICS_ARGS, "--set", "train.compile=true")
    assert_same_training(run, single_reference)


def test_saved_model_loads_in_plain_transformers_and_equals_memory(tmp_path):
    cfg = build_config("tiny").model
    model = build_meta_model(cfg, torch.float32)
    materialize(model, torch.device("cpu"), random_init_source(cfg, seed=7))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_hf_model(state, hf_config(cfg), tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    tokens = torch.randint(cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(loaded(tokens).logits, model(tokens).logits, atol=1e-6)
    assert not list(tmp_path.glob(".model.tmp-*"))  # the staging directory was renamed away


def test_trained_run_directory_loads_with_from_pretrained(tmp_path):
    run = train_run(tmp_path / "run", "--steps", "2")
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    on_disk = load_weights(run / "model")
    assert sum(t.numel() for t in on_disk.values()) == sum(p.numel() for p in model.parameters())
    assert model.config.model_type == "qwen3_moe"


def test_initial_weights_do_not_depend_on_device_placement():
    cfg = build_config("tiny").model
    first, second = build_meta_model(cfg, torch.float32), build_meta_model(cfg, torch.float32)
    materialize(first, torch.device("cpu"), random_init_source(cfg, seed=1))
    materialize(second, torch.device("cpu"), random_init_source(cfg, seed=1))
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    rotary = first.model.rotary_emb.inv_freq
    assert torch.isfinite(rotary).all() and rotary[0] == 1.0


def test_model_flag_starts_from_a_checkpoint(tmp_path):
    start = train_run(tmp_path / "start", "--steps", "2")
    resumed = train_run(
        tmp_path / "from_ckpt", "--steps", "1", "--model", str(start / "model"), "--lr", "1e-9"
    )
    assert weight_rel_error(resumed, start) < 1e-6  # a near-zero step keeps the loaded weights


def test_dry_run_prints_counts_and_writes_nothing(tmp_path):
    result = run_moectl("train", "--config", "qwen3-30b-a3b", "--dry-run", "--run-dir", str(tmp_path / "x"))
    assert result.returncode == 0, result.stderr
    assert (
        "30.5" in result.stdout
        and "flops / token" in result.stdout
        and "memory estimate per rank" in result.stdout
    )
    assert not (tmp_path / "x").exists()


def test_plugin_strategy_from_a_file(tmp_path):
    plugin = tmp_path / "my_strategy.py"
    plugin.write_text("from strategies.single import Single\n\nclass Mine(Single):\n    name = 'mine'\n")
    run = train_run(tmp_path / "plugin", "--strategy", str(plugin), "--steps", "2")
    assert json.loads((run / "summary.json").read_text())["strategy"] == "mine"
