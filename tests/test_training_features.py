"""Training a real model: learning-rate schedule, gradient clipping, auxiliary load-balancing loss,
router bias, expert-load statistics, TensorBoard, loss and expert-load plots.

The multi-process runs (one per kind of gradient layout) each check many things at once: with every
feature on and clipping active, each trains the weights `single` trains and logs the same gradient norm,
auxiliary loss, load imbalance, expert load and router bias. Everything else runs in this process.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter, load_balancing_loss_func

from moectl.config import ModelConfig, TrainConfig, build_config
from moectl.data.sources import build_data
from moectl.errors import UsageError
from moectl.model.build import (
    apply_layer_wrappers,
    build_meta_model,
    hf_config,
    materialize,
    random_init_source,
)
from moectl.model.routing import BIAS_KEY, Router, Routing, auxiliary_loss
from moectl.parallel.dims import ParallelDims
from moectl.run.loop import train_step
from moectl.run.schedule import lr_at
from strategies.single import Single
from tests.util import assert_same_training, run_moectl, run_moectl_in_process, train_run

STEPS, GLOBAL_BATCH, MICRO_BATCH, SEQ_LEN = 20, 8, 2, 32
MAX_GRAD_NORM, AUX_LOSS_COEF, BIAS_RATE = 0.3, 0.01, 0.001
FEATURE_SETTINGS = {
    "timing_warmup_steps": 0,
    "lr_schedule": "cosine",
    "lr_warmup_steps": 3,
    "max_grad_norm": MAX_GRAD_NORM,  # tiny's gradient norms are above 1: every step is clipped
    "aux_loss_coef": AUX_LOSS_COEF,
    "router_bias_update": BIAS_RATE,
}
FEATURE_ARGS = [
    *("--steps", str(STEPS), "--global-batch", str(GLOBAL_BATCH), "--micro-batch", str(MICRO_BATCH)),
    *("--seq-len", str(SEQ_LEN)),
] + [arg for key, value in FEATURE_SETTINGS.items() for arg in ("--set", f"train.{key}={value}")]
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

# Each layout here brings gradients of another kind to the global norm, clipping and the reductions of
# the auxiliary loss and expert load: tp plain replicated ones (embedding, norms, routers) beside tp
# DTensors; mixed DTensors on a 2-D mesh (FSDP over dp, tp inside); ep plain expert shards summed over
# the ep group, replicated over ep_replicate, beside replicated dense ones; ep with FSDP DTensors over
# all ranks and expert shards over their replicas. ddp's (plain replicated) and fsdp's (DTensors on one
# dp axis) are the same kinds again, so they are not run separately.
LAYOUTS = {
    "tp": ["--strategy", "tp", "--tp-size", "2"],
    "mixed": ["--strategy", "mixed", "--dp-size", "2", "--tp-size", "2"],
    # ep 2 on 4 ranks: experts sharded over ep and replicated over ep_replicate
    "ep": ["--strategy", "ep", "--ep-size", "2", "--nproc", "4"],
    "ep_fsdp": ["--strategy", "ep", "--ep-size", "2", "--nproc", "4", "--set", "parallel.fsdp=true"],
}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def feature_reference(tmp_path_factory) -> Path:
    """`single` with every feature on (and TensorBoard when installed): the reference of this file."""
    extra = ["--set", "train.tensorboard=true"] if HAS_TENSORBOARD else []
    return train_run(
        tmp_path_factory.mktemp("features") / "single",
        *("--strategy", "single", *FEATURE_ARGS, *extra),
        in_process=True,
    )


def feature_config():
    return build_config(
        "tiny",
        {
            "train": {
                **FEATURE_SETTINGS,
                "steps": STEPS,
                "global_batch": GLOBAL_BATCH,
                "micro_batch": MICRO_BATCH,
                "seq_len": SEQ_LEN,
            }
        },
    )


# ---- every layout, every feature ----------------------------------------------------------------
def _layout_run(tmp_path_factory, layout: str) -> Callable[[], Path]:
    run_dir = tmp_path_factory.mktemp(f"features-{layout}") / "run"
    return lambda: train_run(run_dir, *LAYOUTS[layout], *FEATURE_ARGS)


def start_ahead(lane, request, items) -> None:
    """Each layout's run starts on the background lane (the reference runs here, in-process)."""
    factory = request.getfixturevalue("tmp_path_factory")
    test = "test_every_kind_of_layout_trains_and_logs_what_single_does"
    lane.start_per_param(items, test, "layout", lambda layout: _layout_run(factory, layout))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_kind_of_layout_trains_and_logs_what_single_does(
    layout, feature_reference, background_lane, tmp_path_factory
):
    key = ("test_every_kind_of_layout_trains_and_logs_what_single_does", layout)
    run = background_lane.result_or_run(key, lambda: _layout_run(tmp_path_factory, layout)())
    assert_same_training(run, feature_reference)  # every tensor's update, the whole model, each loss
    ours, reference = records(run), records(feature_reference)
    assert len(ours) == len(reference) == STEPS
    for key in ("loss", "lr", "grad_norm", "aux_loss", "load_imbalance"):
        worst = max(abs(a[key] - b[key]) / abs(b[key]) for a, b in zip(ours, reference, strict=True))
        assert worst <= 1e-5, f"{layout}: {key} differs by {worst:.2e} (relative) at some step"
    assert [r["grad_clipped"] for r in ours] == [r["grad_clipped"] for r in reference]
    bias, reference_bias = (load_file(r / "router_bias.safetensors") for r in (run, feature_reference))
    assert bias.keys() == reference_bias.keys()
    for key in bias:
        torch.testing.assert_close(bias[key], reference_bias[key], rtol=0, atol=1e-7)
    load, reference_load = (
        load_file(r / "expert_load.safetensors")["expert_load"] for r in (run, feature_reference)
    )
    assert torch.equal(load, reference_load)  # token copies are integers: exactly the same


def test_reference_run_outputs(feature_reference):
    """What one run with every feature writes: the schedule, clipping, statistics, files, summary."""
    run, rows = feature_reference, records(feature_reference)
    train = feature_config().train
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # step 1 is the first optimizer step
    assert [r["lr"] for r in rows] == [lr_at(train, step) for step in range(STEPS)]
    assert rows[0]["lr"] == pytest.approx(train.lr / 3) and rows[-1]["lr"] == pytest.approx(
        train.lr * train.min_lr_ratio
    )
    assert all(r["grad_clipped"] == (r["grad_norm"] > MAX_GRAD_NORM) for r in rows)
    assert sum(r["grad_clipped"] for r in rows) >= STEPS // 2, "the test needs clipping active"
    assert all(r["load_imbalance"] >= 1 and r["aux_loss"] > 0 for r in rows)

    model = build_config("tiny").model
    load = load_file(run / "expert_load.safetensors")["expert_load"]
    assert load.shape == (model.num_layers, model.num_experts) and load.dtype == torch.int64
    # every token of every step chose top_k experts in each layer
    assert load.sum(-1).tolist() == [STEPS * GLOBAL_BATCH * SEQ_LEN * model.top_k] * model.num_layers
    bias = load_file(run / "router_bias.safetensors")
    assert sorted(bias) == sorted(BIAS_KEY.format(layer=i) for i in range(model.num_layers))
    for values in bias.values():
        steps_moved = values / BIAS_RATE  # ±rate per step: a whole number of moves, at most STEPS
        assert values.abs().max() > 0 and values.abs().max() <= STEPS * BIAS_RATE + 1e-6
        assert torch.allclose(steps_moved, steps_moved.round(), atol=1e-3)
    assert not any("e_score_correction_bias" in key for key in load_file(run / "model" / "model.safetensors"))

    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_lr"] == rows[-1]["lr"] and summary["last_grad_norm"] == rows[-1]["grad_norm"]
    assert summary["clipped_steps"] == sum(r["grad_clipped"] for r in rows)
    assert summary["final_load_imbalance"] == rows[-1]["load_imbalance"]
    assert summary["final_aux_loss"] == rows[-1]["aux_loss"]
    assert "router_bias.safetensors" in summary["router_bias"] and "no place" in summary["router_bias"]
    if HAS_MATPLOTLIB:
        assert (run / "loss.png").stat().st_size > 0 and (run / "expert_load.png").stat().st_size > 0


@pytest.mark.skipif(
    not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install 'moectl[tensorboard]')"
)
def test_tensorboard_events_read_back(feature_reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(feature_reference / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "train/loss": "loss",
        "train/lr": "lr",
        "train/grad_norm": "grad_norm",
        "train/aux_loss": "aux_loss",
        "experts/load_imbalance": "load_imbalance",
        "speed/tokens_per_s": "tokens_per_s",
        "memory/peak_gib": "mem_gib",
    }
    assert set(expected) | {"experts/load_imbalance/layer_00", "experts/load_imbalance/layer_01"} <= tags
    assert "speed/mfu" not in tags  # the CPU has no known peak FLOP/s: MFU is n/a, not a number
    rows = records(feature_reference)
    for tag, key in expected.items():
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [r["step"] for r in rows] == list(range(1, STEPS + 1))
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in rows], rel=1e-6)
    per_layer = [events.Scalars(f"experts/load_imbalance/layer_{i:02d}")[-1].value for i in range(2)]
    assert max(per_layer) == pytest.approx(rows[-1]["load_imbalance"], rel=1e-6)


def test_resumed_mid_schedule_ends_bit_identical(tmp_path):
    """Stopped after step 4 of 8 (inside the cosine decay, router bias moving) and resumed, under ep
    on two ranks, the run ends with exactly the uninterrupted run's weights, bias, load and metrics."""
    args = [
        *FEATURE_ARGS,
        "--steps",
        "8",
        "--strategy",
        "ep",
        "--ep-size",
        "2",
        "--checkpoint-every",
        "4",
        "--set",
        "train.keep_checkpoints=0",
    ]
    run = train_run(tmp_path / "run", *args)
    finished = tmp_path / "uninterrupted"
    shutil.copytree(run, finished)
    # Back to the state of a run stopped after step 4: its later checkpoint and final outputs are gone.
    shutil.rmtree(run / "checkpoints" / "step_000008")
    for name in ("model", "summary.json", "router_bias.safetensors", "expert_load.safetensors"):
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = run_moectl("train", "--resume", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed at step 4" in result.stdout
    for name in ("model/model.safetensors", "router_bias.safetensors", "expert_load.safetensors"):
        resumed, reference = load_file(run / name), load_file(finished / name)
        assert resumed.keys() == reference.keys()
        for key in reference:
            assert torch.equal(resumed[key], reference[key]), f"{name}: {key} differs after the resume"
    keys = ("step", "loss", "lr", "grad_norm", "aux_loss", "load_imbalance")
    assert [[r[k] for k in keys] for r in records(run)] == [[r[k] for k in keys] for r in records(finished)]


# ---- in this process ----------------------------------------------------------------------------
def tiny_model(seed: int = 0):
    cfg = build_config("tiny").model
    model = build_meta_model(cfg, torch.float32)
    materialize(model, torch.device("cpu"), random_init_source(cfg, seed))
    return cfg, model


def test_clipping_norm_is_the_norm_of_the_unsharded_gradients(feature_reference):
    """Step 0 of the reference replayed here: the gradient norm every layout logged (they all equal
    `single`'s, above) is the L2 norm of the whole model's gradient computed by hand, in float64."""
    cfg = feature_config()
    model = build_meta_model(cfg.model, torch.float32)
    materialize(model, torch.device("cpu"), random_init_source(cfg.model, cfg.train.seed))
    routing = Routing(model, cfg.model, cfg.train, torch.device("cpu"))
    strategy = Single(ParallelDims(1), cfg.model)
    batch = build_data(cfg.data, cfg.model.vocab_size, cfg.train.seed).global_batch(0, GLOBAL_BATCH, SEQ_LEN)
    loss_sum, aux_sum = train_step(
        model, strategy, batch.split(MICRO_BATCH), GLOBAL_BATCH * SEQ_LEN, routing=routing
    )
    by_hand = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in model.parameters()))
    logged = records(feature_reference)[0]
    assert logged["grad_norm"] == pytest.approx(by_hand, rel=1e-6)
    assert strategy.grad_norm(model).item() == pytest.approx(by_hand, rel=1e-6)
    assert logged["aux_loss"] == pytest.approx(aux_sum.item() / GLOBAL_BATCH, rel=1e-6)


def test_auxiliary_loss_is_transformers_load_balancing_loss_per_sequence():
    cfg, model = tiny_model()
    num_sequences, tokens_per_sequence = 3, 16
    tokens = torch.randint(cfg.vocab_size, (num_sequences, tokens_per_sequence))
    router_logits = model(input_ids=tokens, output_router_logits=True, use_cache=False).router_logits
    per_sequence = [
        load_balancing_loss_func(
            tuple(layer.view(num_sequences, tokens_per_sequence, -1)[s] for layer in router_logits),
            cfg.num_experts,
            cfg.top_k,
        )
        for s in range(num_sequences)
    ]
    # One sequence: exactly transformers' value; a batch: the mean over its sequences.
    one = auxiliary_loss(
        [layer[:tokens_per_sequence] for layer in router_logits],
        cfg.num_experts,
        cfg.top_k,
        tokens_per_sequence,
    )
    torch.testing.assert_close(one, per_sequence[0], rtol=1e-6, atol=0)
    batch = auxiliary_loss(list(router_logits), cfg.num_experts, cfg.top_k, tokens_per_sequence)
    torch.testing.assert_close(batch, torch.stack(per_sequence).mean(), rtol=1e-6, atol=0)

    # What the training loop adds is that same value, from the routing the routers recorded.
    train = TrainConfig(aux_loss_coef=0.5, seq_len=tokens_per_sequence, global_batch=num_sequences)
    routing = Routing(model, cfg, train, torch.device("cpu"))
    with routing.recording():
        model(input_ids=tokens, use_cache=False)
    torch.testing.assert_close(routing.take_forward() / num_sequences, batch, rtol=1e-6, atol=0)


def test_the_auxiliary_loss_enters_the_gradient_as_a_mean_over_the_global_batch():
    """train_step over 4 micro-batches with the auxiliary loss on gives the gradient of one big batch's
    mean token loss + coef · transformers' load-balancing loss averaged over the global batch's
    sequences. Every layout is compared with `single` above, so a normalisation wrong in the same way
    everywhere (per micro-batch, per token) would pass there: this pins it to the definition."""
    coef = 0.5  # large, so the auxiliary term is a sizeable part of the router's gradient
    cfg = build_config("tiny", {"train": {"aux_loss_coef": coef, "seq_len": SEQ_LEN}})
    batch = build_data(cfg.data, cfg.model.vocab_size, cfg.train.seed).global_batch(0, GLOBAL_BATCH, SEQ_LEN)
    strategy = Single(ParallelDims(1), cfg.model)

    def loop_gradients(aux_loss_coef: float) -> dict[str, torch.Tensor]:
        _, model = tiny_model(cfg.train.seed)
        train = TrainConfig(aux_loss_coef=aux_loss_coef, seq_len=SEQ_LEN, global_batch=GLOBAL_BATCH)
        routing = Routing(model, cfg.model, train, torch.device("cpu"))
        train_step(model, strategy, batch.split(MICRO_BATCH), GLOBAL_BATCH * SEQ_LEN, routing=routing)
        return {name: param.grad.clone() for name, param in model.named_parameters()}

    _, model = tiny_model(cfg.train.seed)
    out = model(input_ids=batch.input_ids, output_router_logits=True, use_cache=False)
    token_loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch.labels.flatten())
    per_sequence = [
        load_balancing_loss_func(
            tuple(layer.view(GLOBAL_BATCH, SEQ_LEN, -1)[s] for layer in out.router_logits),
            cfg.model.num_experts,
            cfg.model.top_k,
        )
        for s in range(GLOBAL_BATCH)
    ]
    (token_loss + coef * torch.stack(per_sequence).mean()).backward()
    expected = {name: param.grad for name, param in model.named_parameters()}

    got, without_aux = loop_gradients(coef), loop_gradients(0.0)
    router = "model.layers.0.mlp.gate.weight"
    share = (got[router] - without_aux[router]).norm() / got[router].norm()
    assert share > 0.05, f"the auxiliary loss moves the router's gradient by only {share:.1e}"
    for name, grad in expected.items():
        error = ((got[name] - grad).norm() / grad.norm()).item()
        assert error < 1e-5, f"{name}: gradient differs by {error:.2e} (relative)"


def test_router_is_transformers_router_bit_for_bit_and_bias_moves_only_the_choice():
    cfg, model = tiny_model()
    router = model.model.layers[0].mlp.gate
    assert isinstance(router, Router) and isinstance(router, Qwen3MoeTopKRouter)
    reference = Qwen3MoeTopKRouter(model.config)
    reference.weight = router.weight
    x = torch.randn(64, cfg.hidden_size)
    for ours, theirs in zip(router(x), reference(x), strict=True):
        assert torch.equal(ours, theirs)

    Routing(model, cfg, TrainConfig(router_bias_update=0.01, expert_load_stats=False), torch.device("cpu"))
    router.e_score_correction_bias[3] = 10.0  # expert 3 always chosen, still weighted by its probability
    logits, scores, indices = router(x)
    probs = torch.softmax(logits, -1)
    assert (indices == 3).any(-1).all()
    chosen = probs.gather(-1, indices)
    torch.testing.assert_close(scores, chosen / chosen.sum(-1, keepdim=True))


def test_bias_updates_lower_the_imbalance_of_a_skewed_router():
    torch.manual_seed(0)
    router = Router(hf_config(build_config("tiny", {"model": {"hidden_size": 16}}).model))
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 16) * 0.1)
        router.weight[0] += 0.3  # inputs lean on every feature: experts 0 and 1 take most tokens
        router.weight[1] += 0.2
    model_config = ModelConfig(num_layers=1, num_experts=8, top_k=2, hidden_size=16)
    train = TrainConfig(router_bias_update=0.002, seq_len=64, global_batch=4)
    routing = Routing(torch.nn.ModuleList([router]), model_config, train, torch.device("cpu"))

    def one_step() -> float:
        with routing.recording():
            router(torch.randn(4 * 64, 16) + 0.5)
        routing.take_forward()
        _, step = routing.reduce_step(torch.zeros(()), None, None)
        routing.finish_step(step)
        return step.load_imbalance

    imbalance = [one_step() for _ in range(300)]
    assert imbalance[0] > 3, imbalance[0]  # expert 0 receives over three times its share
    assert max(imbalance[-20:]) < 1.5, imbalance[-20:]
    bias = router.e_score_correction_bias
    assert bias[0] < 0 < bias[2:].min()  # the overloaded expert is pushed down, the idle ones up


def test_activation_checkpointing_records_each_forward_once():
    """The backward recomputes each layer's forward under activation checkpointing: not recorded."""
    cfg, model = tiny_model()
    train = TrainConfig(aux_loss_coef=0.01, seq_len=16, global_batch=4, activation_checkpointing=True)
    apply_layer_wrappers(model, train)  # the project's switch, as every strategy applies it
    model.train()
    routing = Routing(model, cfg, train, torch.device("cpu"))
    for _ in range(2):  # a second forward would find the first one's recomputed records
        tokens = torch.randint(cfg.vocab_size, (2, 17))
        with routing.recording():
            logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
        aux_sum = routing.take_forward()
        (logits.sum() * 0 + aux_sum).backward()
    assert routing.step_load.sum(-1).tolist() == [2 * 2 * 16 * cfg.top_k] * cfg.num_layers


def test_learning_rate_schedules():
    train = TrainConfig(lr=1.0, steps=11, lr_warmup_steps=2, min_lr_ratio=0.1)
    assert [lr_at(train, s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]  # constant after the ramp
    train.lr_schedule = "linear"
    assert [lr_at(train, s) for s in (0, 1, 2, 10)] == pytest.approx([0.5, 1.0, 1.0, 0.1])
    assert lr_at(train, 6) == pytest.approx(0.1 + 0.9 * 4 / 8)
    train.lr_schedule = "cosine"
    assert [lr_at(train, s) for s in (1, 2, 6, 10)] == pytest.approx([1.0, 1.0, 0.55, 0.1])


def test_config_keys_defaults_and_refusals(tmp_path, monkeypatch):
    tiny, qwen = build_config("tiny").train, build_config("qwen3-30b-a3b").train
    assert (
        tiny.lr_schedule,
        tiny.lr_warmup_steps,
        tiny.max_grad_norm,
        tiny.aux_loss_coef,
        tiny.router_bias_update,
    ) == ("constant", 0, 0.0, 0.0, 0.0)  # the seed's training
    assert qwen.aux_loss_coef == 0.001  # Qwen3-MoE's router_aux_loss_coef
    with pytest.raises(UsageError, match=r"train.warmup_steps was renamed: use train.timing_warmup_steps"):
        build_config("tiny", {"train": {"warmup_steps": 1}})
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump({"train": {"warmup_steps": 2}}))
    with pytest.raises(UsageError, match=rf"warmup_steps \(in {saved}\) was renamed.*lr_warmup_steps"):
        build_config(str(saved))
    for key, value, message in (
        ("lr_schedule", "step", "must be one of constant, cosine, linear"),
        ("min_lr_ratio", 1.5, r"must lie in \[0, 1\]"),
        ("max_grad_norm", -1, "must not be negative"),
        ("router_bias_update", -0.1, "must not be negative"),
    ):
        with pytest.raises(UsageError, match=message):
            build_config("tiny", {"train": {key: value}})

    import moectl.run.tensorboard_log

    monkeypatch.setattr(moectl.run.tensorboard_log.importlib.util, "find_spec", lambda name: None)
    from moectl.run.prepare import prepare

    with pytest.raises(UsageError, match=r"pip install 'moectl\[tensorboard\]'"):
        prepare(None, {"train": {"tensorboard": True}}, run_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_old_key_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    result = run_moectl_in_process(
        "train", "--run-dir", str(tmp_path / "run"), "--set", "train.warmup_steps=1"
    )
    assert result.returncode == 2
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    assert len(lines) == 1 and "train.timing_warmup_steps" in lines[0], lines
    assert not (tmp_path / "run").exists()
