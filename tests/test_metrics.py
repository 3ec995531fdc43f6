import dataclasses

import pytest
import torch

from moectl.config import ModelConfig, build_config
from moectl.model.sizing import (
    count_params,
    device_peak_flops,
    estimate_memory_gib,
    flops_per_token,
    format_mfu,
    mfu,
    seed_flops_per_token,
)


def hand_count_30b():
    """Qwen3-30B-A3B counted by hand from its published dimensions."""
    hidden, layers, vocab, experts, top_k, inter = 2048, 48, 151936, 128, 8, 768
    q, kv = 32 * 128, 4 * 128
    attention = hidden * q + 2 * hidden * kv + q * hidden  # q, k, v, o
    expert_params = experts * 3 * hidden * inter  # gate, up, down
    router = experts * hidden
    norms = 2 * hidden + 2 * 128
    total = 2 * vocab * hidden + layers * (attention + expert_params + router + norms) + hidden
    active = total - layers * expert_params * (1 - top_k / experts)
    active_matmul = vocab * hidden + layers * (attention + router + expert_params * top_k / experts)
    return total, active, active_matmul


def test_30b_parameter_counts_match_hand_count():
    counts = count_params(build_config("qwen3-30b-a3b").model)
    total, active, active_matmul = hand_count_30b()
    assert counts.total == total
    assert counts.active == int(active)
    assert counts.active_matmul == int(active_matmul)
    assert counts.total == pytest.approx(30.53e9, rel=2e-3)
    assert counts.active == pytest.approx(3.35e9, rel=5e-3)
    assert counts.active_matmul == pytest.approx(3.04e9, rel=5e-3)


def test_30b_flops_per_token_formula():
    cfg = build_config("qwen3-30b-a3b").model
    _, active, active_matmul = hand_count_30b()
    attention = 12 * 48 * 32 * 128 * 4096
    assert flops_per_token(cfg, 4096) == pytest.approx(6 * active_matmul + attention)
    assert seed_flops_per_token(cfg) == pytest.approx(6 * active)


def test_tied_embeddings_count_once():
    untied, tied = count_params(ModelConfig()), count_params(ModelConfig(tie_word_embeddings=True))
    assert untied.total - tied.total == ModelConfig().vocab_size * ModelConfig().hidden_size
    assert untied.active_matmul == tied.active_matmul  # the output matmul counts either way


def test_peak_table_and_unknown_devices():
    assert device_peak_flops(torch.device("cpu")) is None
    assert device_peak_flops(torch.device("cpu"), override_tflops=100) == 100e12
    assert mfu(1e9, 1000.0, None) is None and format_mfu(None) == "n/a"
    assert mfu(1e9, 1000.0, 1e13) == pytest.approx(0.1)


# Peaks measured on one H200 (bf16, SGD without momentum, seq 4096; BENCHMARKS.md "memory estimate"):
# (layers, experts, micro-batch, compile, activation checkpointing, measured GiB).
H200_PEAKS = [
    (8, 128, 2, False, False, 49.2),
    (8, 128, 4, False, False, 77.4),
    (8, 128, 2, True, False, 35.3),
    (8, 128, 4, True, False, 49.1),
    (8, 128, 2, True, True, 26.6),
    (48, 32, 1, True, False, 62.7),
    (48, 32, 2, True, False, 92.0),
]


@pytest.mark.parametrize("layers, experts, micro_batch, compiled, checkpointing, measured", H200_PEAKS)
def test_memory_estimate_reproduces_measured_peaks(
    layers, experts, micro_batch, compiled, checkpointing, measured
):
    """The dry-run estimate stays within 5 % of the peak torch allocated on the GPU for the same config."""
    cfg = build_config("qwen3-30b-a3b")
    model = dataclasses.replace(cfg.model, num_layers=layers, num_experts=experts)
    train = dataclasses.replace(
        cfg.train,
        micro_batch=micro_batch,
        seq_len=4096,
        compile=compiled,
        activation_checkpointing=checkpointing,
    )
    estimate = estimate_memory_gib(model, train, count_params(model).total, param_bytes=2)
    assert estimate == pytest.approx(measured, rel=0.05)
