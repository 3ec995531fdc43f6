"""Single-GPU speed levers: the chunked lm_head + loss and selective activation checkpointing train the same
model as `single`'s defaults, and each saves what it claims to save."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from moectl.config import build_config
from moectl.model.build import SELECTIVE_RECOMPUTE_FLAGS, build_meta_model, materialize, random_init_source
from moectl.model.loss import (
    chunk_loss_and_grad,
    chunked_linear_cross_entropy,
    fused_chunk_loss_and_grad,
    token_loss_sum,
)
from moectl.model.sizing import count_params, estimate_memory_gib
from tests.layouts import CHUNKED_LOSS, LAYOUTS
from tests.util import NUMERICS_ARGS, assert_same_training, run_moectl_in_process, train_run

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile on the CPU needs cc")


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected.double()).norm() / expected.double().norm())


def reference_loss_and_grads(hidden, weight, targets, grad_scale):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    loss = token_loss_sum(F.linear(hidden, weight).unsqueeze(0), targets.unsqueeze(0))
    (loss * grad_scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def chunked_loss_and_grads(hidden, weight, targets, chunk, grad_scale, backward_factor, loss_fn):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    loss = chunked_linear_cross_entropy(hidden, weight, targets, chunk, grad_scale, loss_fn)
    (loss * backward_factor).backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("loss_fn", [chunk_loss_and_grad, fused_chunk_loss_and_grad])
@pytest.mark.parametrize("chunk", [7, 16, 100])  # uneven last chunk, even chunks, one chunk
def test_chunked_head_equals_logits_and_cross_entropy(loss_fn, chunk):
    """Same summed loss and the same gradients of hidden states and head weight (fp32), also when the
    backward starts from another factor than the grad_scale the forward assumed."""
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 16, generator=generator), torch.randn(50, 16, generator=generator)
    targets = torch.randint(0, 50, (37,), generator=generator)
    loss, grad_hidden, grad_weight = reference_loss_and_grads(hidden, weight, targets, 0.3)
    for factor in (0.3, 2.0):
        got = chunked_loss_and_grads(hidden, weight, targets, chunk, 0.3, factor, loss_fn)
        torch.testing.assert_close(got[0], loss, rtol=1e-6, atol=0)
        assert relative_error(got[1], grad_hidden * factor / 0.3) < 1e-6
        assert relative_error(got[2], grad_weight * factor / 0.3) < 1e-6
    with torch.no_grad():
        no_grad = chunked_linear_cross_entropy(hidden, weight, targets, chunk)
    torch.testing.assert_close(no_grad, loss, rtol=1e-6, atol=0)


def test_chunked_head_in_bfloat16_rounds_like_the_unchunked_head():
    """bf16 hidden states and weight (what GPUs train): the loss is the fp32 loss of the same bf16
    logits; the gradients differ only by bf16 rounding of the weight gradient's per-chunk accumulation."""
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(64, 32, generator=generator).bfloat16()
    weight = (torch.randn(200, 32, generator=generator) * 0.2).bfloat16()
    targets = torch.randint(0, 200, (64,), generator=generator)
    loss, grad_hidden, grad_weight = reference_loss_and_grads(hidden, weight, targets, 1 / 64)
    got = chunked_loss_and_grads(hidden, weight, targets, 16, 1 / 64, 1 / 64, chunk_loss_and_grad)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], loss, rtol=1e-6, atol=0)
    assert relative_error(got[1], grad_hidden) < 1e-2 and relative_error(got[2], grad_weight) < 1e-2


@needs_compiler
def test_compiled_chunk_kernel_equals_eager():
    logits = torch.randn(24, 300).bfloat16()
    targets = torch.randint(0, 300, (24,))
    eager = chunk_loss_and_grad(logits, targets, 0.25)
    compiled = torch.compile(fused_chunk_loss_and_grad)(logits, targets, 0.25)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-2, atol=1e-6)


def test_chunked_loss_trains_the_same_model(tmp_path, single_reference, layout_data):
    """train.loss_chunk_tokens moves the head inside the root module's forward (FSDP2 gathers it there,
    DDP hooks it there): on one process here; under fsdp, ep and mixed over DDP in the shared layouts,
    each compared with `single` (test_fsdp, test_ep, test_tp)."""
    run = train_run(tmp_path / "chunked", *NUMERICS_ARGS, *CHUNKED_LOSS, *layout_data, in_process=True)
    assert_same_training(run, single_reference)
    for layout in ("fsdp", "ep", "mixed_ddp"):
        assert " ".join(CHUNKED_LOSS) in " ".join(LAYOUTS[layout]), layout


def saved_activation_bytes(layer, hidden, position_embeddings) -> int:
    """Bytes of the tensors autograd keeps for backward (parameters and the input excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {
        hidden.untyped_storage().data_ptr()
    }
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(hidden, attention_mask=None, position_embeddings=position_embeddings)
    return sum(kept.values())


def test_selective_recompute_keeps_fewer_activations_of_a_compiled_layer():
    """The partitioner flags behind `selective` drop cheap-to-recompute activations of a compiled decoder
    layer (the MoE block's copies of its input per chosen expert among them), and gradients stay equal.

    The backend `aot_eager_decomp_partition` runs Inductor's decompositions and its min-cut partitioner,
    where the flags act, without generating C++ (seconds of compiler per graph on the CPU); the compiled
    run in tests/test_train.py trains through Inductor itself with these flags."""
    cfg = build_config("tiny", {"model": {"hidden_size": 64, "top_k": 4, "moe_intermediate_size": 32}}).model
    model = build_meta_model(cfg, torch.float32)
    materialize(model, torch.device("cpu"), random_init_source(cfg, seed=0))
    layer = model.model.layers[0]
    hidden = torch.randn(1, 32, cfg.hidden_size, requires_grad=True)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(32)[None])

    def saved_and_grads(flags: dict[str, bool]) -> tuple[int, list[torch.Tensor]]:
        torch._dynamo.reset()
        layer.zero_grad(set_to_none=True)
        with torch._functorch.config.patch(**flags):
            compiled = torch.compile(layer, backend="aot_eager_decomp_partition")
            saved = saved_activation_bytes(compiled, hidden, position_embeddings)
            compiled(hidden, attention_mask=None, position_embeddings=position_embeddings).sum().backward()
        return saved, [p.grad.clone() for p in layer.parameters()]

    default_bytes, default_grads = saved_and_grads({})
    selective_bytes, selective_grads = saved_and_grads(SELECTIVE_RECOMPUTE_FLAGS)
    torch._dynamo.reset()
    assert selective_bytes < 0.8 * default_bytes, (selective_bytes, default_bytes)
    for got, expected in zip(selective_grads, default_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_checkpointing_modes_and_their_one_line_refusals(tmp_path):
    assert build_config(
        "tiny", {"train": {"activation_checkpointing": True}}
    ).train.activation_checkpointing == ("full")
    assert build_config(
        "tiny", {"train": {"activation_checkpointing": "off"}}
    ).train.activation_checkpointing == ("none")
    for value, hint in (("some", "one of none, full, selective"), ("selective", "train.compile=true")):
        result = run_moectl_in_process(
            "train", "--run-dir", str(tmp_path / value), "--set", f"train.activation_checkpointing={value}"
        )
        assert result.returncode == 2 and hint in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / value).exists()


def test_memory_estimate_counts_one_chunk_of_logits_and_fewer_selective_activations():
    cfg = build_config("qwen3-30b-a3b", {"model": {"num_layers": 8}, "train": {"seq_len": 4096}})
    params = count_params(cfg.model).total

    def estimate(**train_keys) -> float:
        train = build_config(
            "qwen3-30b-a3b", {"train": {"seq_len": 4096, "compile": True, **train_keys}}
        ).train
        return estimate_memory_gib(cfg.model, train, params, param_bytes=2)

    vocab, hidden = cfg.model.vocab_size, cfg.model.hidden_size
    whole_logits = 2 * 2 * 8 * 4096 * vocab  # bf16 logits and their gradient, 8 sequences of 4096
    one_chunk = 2 * 2 * 4096 * vocab + 2 * (vocab + 8 * 4096) * hidden  # and the head's gradients
    whole = estimate(micro_batch=8)
    chunked = estimate(micro_batch=8, loss_chunk_tokens=4096)
    assert whole - chunked == pytest.approx((whole_logits - one_chunk) / 2**30)
    recomputed = cfg.model.top_k * (hidden + cfg.model.moe_intermediate_size) + 2 * hidden  # per token, layer
    selective = estimate(micro_batch=8, activation_checkpointing="selective")
    assert whole - selective == pytest.approx(8 * 4096 * 8 * recomputed * 2 / 2**30)
    assert estimate(micro_batch=8, activation_checkpointing=True) == estimate(
        micro_batch=8, activation_checkpointing="full"
    )


def test_plan_reads_the_checkpointing_mode_and_sizes_both_levers():
    """`moectl plan` (and the prediction every GPU run writes) plans full checkpointing as full, and sizes
    a selective or chunked run's memory with the estimate (it has no time figures for them)."""
    from moectl.plan.predict import predict
    from moectl.registry import build_strategy

    def planned(**train_keys):
        cfg = build_config(
            "qwen3-30b-a3b", {"model": {"num_layers": 8}, "train": {"micro_batch": 8, **train_keys}}
        )
        return predict(build_strategy(cfg, 1), cfg.train, "h200")

    full, plain = planned(activation_checkpointing=True), planned()
    assert full == planned(activation_checkpointing="full") and full.compute_s > plain.compute_s
    selective = planned(activation_checkpointing="selective")
    assert selective.step_time_s == plain.step_time_s  # planned as no checkpointing: no time figures
    assert selective.peak_mem_gib < plain.peak_mem_gib
    assert planned(loss_chunk_tokens=4096).peak_mem_gib < plain.peak_mem_gib - 10
