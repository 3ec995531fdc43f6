"""`train.fp8` and `train.fp8_experts`: which GEMMs they convert, that they quantise them, and where they
refuse to run. (Speed and loss curves against bf16 need a Hopper GPU: BENCHMARKS.md. The padded expert
groups FP8's grouped GEMM takes are checked against transformers' block in test_moe_dispatch.py.)"""

from __future__ import annotations

import sys

import pytest
import torch

from moectl.config import build_config
from moectl.errors import UsageError
from moectl.model import fp8
from moectl.registry import build_strategy
from tests.ep_blocks import tiny_model
from tests.util import refused_in_process

pytest.importorskip("torchao.float8")  # the dev extra installs it


def _loss_and_grads(model, tokens):
    model.zero_grad()
    logits = model(tokens).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_attention_projections_run_quantised_and_nothing_else_changes():
    """Exactly the attention q and o projections become Float8Linear (k, v, router, experts, lm_head stay); names and
    values are unchanged; the loss and gradients move by FP8's rounding, not more and not zero."""
    cfg, model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    loss_ref, grads_ref = _loss_and_grads(model, tokens)

    assert fp8.convert_linears(model, emulate=True) == 2 * cfg.num_layers
    converted = {name for name, m in model.named_modules() if type(m).__name__ == "Float8Linear"}
    assert converted == {
        f"model.layers.{layer}.{proj}" for layer in range(cfg.num_layers) for proj in fp8.FP8_LINEARS
    }
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name].detach(), value), name

    loss, grads = _loss_and_grads(model, tokens)
    assert 0 < abs(loss - loss_ref) / loss_ref < 1e-2, (loss, loss_ref)
    # e4m3 keeps 3 mantissa bits: the converted projections' gradients move by ~10 % at hidden 64 (the
    # MoE tensors by up to 57 %, as a few tokens' top-k choices flip; 8 % over the whole model).
    for name, grad in grads.items():
        if name.removesuffix(".weight").endswith(fp8.FP8_LINEARS):
            error = float((grad - grads_ref[name]).norm() / grads_ref[name].norm())
            assert error < 0.25, (name, error)
    whole = torch.cat([(grads[name] - grads_ref[name]).flatten() for name in grads]).norm()
    assert whole / torch.cat([g.flatten() for g in grads_ref.values()]).norm() < 0.2
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(grads[q_proj], grads_ref[q_proj])  # its GEMMs did run in FP8


def test_projections_fp8_cannot_hold_stay_as_they_are():
    layer = torch.nn.Linear(24, 64)
    assert not fp8.is_fp8_linear(layer, "model.layers.0.self_attn.q_proj")
    assert fp8.is_fp8_linear(torch.nn.Linear(32, 64), "model.layers.0.self_attn.q_proj")
    assert not fp8.is_fp8_linear(torch.nn.Linear(32, 64), "lm_head")


@pytest.mark.parametrize(
    "args, words",
    [
        (
            ["--set", "train.fp8=true"],
            ["train.fp8 needs NVIDIA GPUs", "on the CPU", "drop --set train.fp8=true"],
        ),
        (
            ["--set", "train.fp8_experts=true", "--strategy", "ep"],
            ["train.fp8_experts needs NVIDIA GPUs", "drop --set train.fp8_experts=true"],
        ),
        (
            ["--set", "train.fp8=true", "--strategy", "tp", "--tp-size", "2", "--nproc", "2"],
            ["tensor parallelism", "--strategy ep"],
        ),
        (
            ["--set", "train.fp8_experts=true", "--strategy", "fsdp"],
            ["transformers' experts", "--strategy ep"],
        ),
    ],
    ids=["cpu", "experts-cpu", "tp", "experts-not-ep"],
)
def test_fp8_where_it_cannot_run_is_refused_before_anything_is_written(tmp_path, capsys, args, words):
    run_dir = tmp_path / "run"
    refused_in_process(["train", *args, "--run-dir", str(run_dir)], capsys, *words)
    assert not run_dir.exists()


def test_fp8_without_torchao_or_on_an_older_gpu_names_the_fix(monkeypatch):
    cfg = build_config("tiny", {"parallel": {"strategy": "ep"}})
    train, ep = cfg.train, build_strategy(cfg, 1)
    train.fp8 = True
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (8, 0))
    with pytest.raises(UsageError, match="compute capability 8.9 or newer; this GPU has 8.0"):
        fp8.check(train, True, torch.bfloat16, ep)
    with pytest.raises(UsageError, match=r"needs bf16 compute.*--set train.precision=mixed"):
        fp8.check(train, True, torch.float32, ep)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    fp8.check(train, True, torch.bfloat16, ep)  # a Hopper GPU with torchao: nothing to refuse
    monkeypatch.setitem(sys.modules, "torchao.prototype.moe_training.fp8_grouped_mm", None)
    with pytest.raises(UsageError, match=r"needs torchao .*pip install 'moectl\[fp8\]'"):
        fp8.check(train, True, torch.bfloat16, ep)


def test_float8_linears_train_fp32_master_weights_under_mixed():
    """`train.fp8` under `train.precision=mixed`: a Float8Linear takes the fp32 master weight as it is (its
    scales from the fp32 values), answers in its input's bf16 and gives the weight an fp32 gradient."""
    cfg, model = tiny_model()
    fp8.convert_linears(model, emulate=True)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Float8Linear" and q_proj.weight.dtype == torch.float32
    hidden = torch.randn(4, cfg.hidden_size, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        out = q_proj(hidden)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16 and q_proj.weight.grad.dtype == torch.float32
    exact = torch.nn.functional.linear(hidden.float(), q_proj.weight.detach())
    error = float((out.float() - exact).norm() / exact.norm())
    assert 0 < error < 0.1, error  # FP8's rounding (e4m3: 3 mantissa bits), no more
