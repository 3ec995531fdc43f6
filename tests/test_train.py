"""End-to-end behaviour of `moectl train` with the single strategy."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from moectl.config import build_config
from moectl.io.hf import save_hf_model
from moectl.model.build import build_meta_model, hf_config, materialize, random_init_source
from tests.util import (
    NUMERICS_ARGS,
    assert_same_training,
    load_weights,
    run_moectl_in_process,
    train_run,
)


def test_default_train_runs_and_loss_falls(tmp_path):
    """`moectl train` with no arguments: tiny preset, CPU, built-in data, loss visibly falls."""
    run = train_run(tmp_path / "default", in_process=True)
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
    accumulated = train_run(tmp_path / "mb1", *common, "--micro-batch", "1", in_process=True)
    one_shot = train_run(tmp_path / "mb4", *common, "--micro-batch", "4", in_process=True)
    assert_same_training(accumulated, one_shot, rtol=1e-6, loss_tol=1e-6)


def _compiled_run(tmp_path_factory, layout_data: list[str]) -> Callable[[], Path]:
    run_dir = tmp_path_factory.mktemp("compiled") / "run"
    compiled = ["--set", "train.compile=true", "--set", "train.activation_checkpointing=selective"]
    return lambda: train_run(run_dir, *NUMERICS_ARGS, *compiled, *layout_data)


def start_ahead(lane, request, items) -> None:
    """The compiled run (half a minute of compiling with an empty cache) starts on the background lane."""
    wanted = "test_compiled_layers_and_loss_with_selective_recompute_train_the_same_model"
    if shutil.which("cc") and any(item.originalname == wanted for item in items):
        factory, data = request.getfixturevalue("tmp_path_factory"), request.getfixturevalue("layout_data")
        lane.start("compiled", _compiled_run(factory, data))


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile on the CPU needs a C compiler")
def test_compiled_layers_and_loss_with_selective_recompute_train_the_same_model(
    background_lane, tmp_path_factory, single_reference, layout_data
):
    """train.compile=true (each decoder layer and the loss through Inductor) with
    activation_checkpointing=selective (the partitioner's recompute flags on those compiled graphs)
    changes speed, not the model. One run for both: selective adds only the flags to the compiled
    layers (tests/test_speed_levers.py checks what they save), and each compile costs seconds here."""
    run = background_lane.result_or_run("compiled", lambda: _compiled_run(tmp_path_factory, layout_data)())
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


def _expected_per_expert(fused: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """transformers' in-memory experts (gate_up_proj [E, 2I, H] = gate rows then up rows, down_proj
    [E, H, I]) written as the per-expert keys save_pretrained puts on disk."""
    out = {}
    for key, tensor in fused.items():
        prefix, _, kind = key.rpartition(".")
        if kind == "gate_up_proj":
            for expert in range(num_experts):
                gate, up = tensor[expert].chunk(2, dim=0)
                out[f"{prefix}.{expert}.gate_proj.weight"], out[f"{prefix}.{expert}.up_proj.weight"] = (
                    gate,
                    up,
                )
        elif kind == "down_proj" and prefix.endswith("mlp.experts"):
            for expert in range(num_experts):
                out[f"{prefix}.{expert}.down_proj.weight"] = tensor[expert]
        else:
            out[key] = tensor
    return out


@pytest.mark.layouts("ep_fsdp")
def test_a_distributed_run_loads_in_transformers_with_its_weights_and_logits(trained, single_reference):
    """ep 2 on 4 processes with FSDP: experts gathered from shards over replicas and EP ranks. Plain
    from_pretrained finds every key (it would fill a missing one with random values and only warn),
    holds exactly the tensors on disk, and computes the logits of the model `single` trained."""
    cfg = build_config("tiny").model
    tokens = torch.randint(cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, run in (("ep_fsdp", trained("ep_fsdp")), ("single", single_reference)):
        model, info = AutoModelForCausalLM.from_pretrained(run / "model", output_loading_info=True)
        assert not any(info.get(kind) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), (
            info
        )
        on_disk = load_weights(run / "model")
        in_memory = _expected_per_expert(model.state_dict(), cfg.num_experts)
        assert in_memory.keys() == on_disk.keys()
        for key, tensor in on_disk.items():
            assert torch.equal(in_memory[key], tensor), key
        with torch.no_grad():
            logits[name] = model(tokens).logits
    torch.testing.assert_close(logits["ep_fsdp"], logits["single"], rtol=1e-4, atol=1e-5)


def test_initial_weights_are_a_pure_function_of_seed_and_name():
    """What lets every layout start from `single`'s weights: each rank draws a parameter's full tensor
    by (seed, name) and keeps its shard. So no draw may depend on the global RNG, on the order in
    which parameters are drawn, or on which other parameters exist; and the seed must matter."""
    cfg = build_config("tiny").model
    shapes = dict(build_meta_model(cfg, torch.float32).named_parameters())
    in_order = {
        name: random_init_source(cfg, seed=1)(name, p.shape, torch.device("cpu"))
        for name, p in shapes.items()
    }
    torch.manual_seed(1234)  # a different global RNG state, and the reverse order
    reverse = {
        name: random_init_source(cfg, seed=1)(name, shapes[name].shape, torch.device("cpu"))
        for name in reversed(shapes)
    }
    for name in shapes:
        assert torch.equal(in_order[name], reverse[name]), name
    alone = random_init_source(cfg, seed=1)(
        "model.layers.1.mlp.gate.weight", shapes["model.layers.1.mlp.gate.weight"].shape, torch.device("cpu")
    )
    assert torch.equal(alone, in_order["model.layers.1.mlp.gate.weight"])
    other_seed = random_init_source(cfg, seed=2)(
        "model.layers.1.mlp.gate.weight", alone.shape, torch.device("cpu")
    )
    assert not torch.allclose(other_seed, alone)
    # Two parameters of one shape get different values (the name enters the draw).
    assert not torch.allclose(
        in_order["model.layers.0.self_attn.q_proj.weight"], in_order["model.layers.1.self_attn.q_proj.weight"]
    )
    # A whole model materialised on the CPU holds exactly those draws, norms at one.
    model = build_meta_model(cfg, torch.float32)
    materialize(model, torch.device("cpu"), random_init_source(cfg, seed=1))
    for name, param in model.named_parameters():
        assert torch.equal(param, in_order[name]), name
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    rotary = model.model.rotary_emb.inv_freq
    assert torch.isfinite(rotary).all() and rotary[0] == 1.0


def test_model_flag_starts_from_a_checkpoint(tmp_path):
    start = train_run(tmp_path / "start", "--steps", "2", in_process=True)
    resumed = train_run(
        tmp_path / "from_ckpt",
        "--steps",
        "1",
        "--model",
        str(start / "model"),
        "--lr",
        "1e-9",
        in_process=True,
    )
    before, after = load_weights(start / "model"), load_weights(resumed / "model")
    assert before.keys() == after.keys()
    for key in before:  # a near-zero step keeps the loaded weights
        torch.testing.assert_close(after[key], before[key], rtol=1e-6, atol=1e-9)


def test_dry_run_prints_counts_and_writes_nothing(tmp_path):
    result = run_moectl_in_process(
        "train", "--config", "qwen3-30b-a3b", "--dry-run", "--run-dir", str(tmp_path / "x")
    )
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
    run = train_run(tmp_path / "plugin", "--strategy", str(plugin), "--steps", "2", in_process=True)
    assert json.loads((run / "summary.json").read_text())["strategy"] == "mine"


def test_plugin_strategy_as_module_and_class(tmp_path, monkeypatch, single_reference, layout_data):
    """`--strategy package.module:Class` from an importable package trains what its base trains."""
    package = tmp_path / "site" / "acme_layouts"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "layouts.py").write_text(
        "from strategies.single import Single\n\n\nclass Plain(Single):\n    name = 'acme-plain'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    args = ["--strategy", "acme_layouts.layouts:Plain", *NUMERICS_ARGS, *layout_data]
    run = train_run(tmp_path / "run", *args, in_process=True)
    assert json.loads((run / "summary.json").read_text())["strategy"] == "acme-plain"
    assert_same_training(
        run, single_reference, update_rtol=0, rtol=0, loss_tol=0, val_loss_tol=0
    )  # same path
