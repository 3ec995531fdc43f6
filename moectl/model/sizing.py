"""Parameter counts, flops per token and MFU, exactly as the README states the formulas."""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch

from moectl.config import ModelConfig, TrainConfig, checkpointing_mode

# Dense bf16 peak FLOP/s per device (SXM parts, no sparsity). Longer names first: "H200" contains "H20".
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("H20", 148e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
]


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int  # per token: routed experts scaled by top_k / num_experts, embeddings included
    active_matmul: int  # matmul weights a token passes through; input embedding excluded unless tied
    experts: int  # all routed-expert weights
    embedding: int  # input embedding + lm_head

    @property
    def dense(self) -> int:
        return self.total - self.experts


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Hand count from the dimensions, so `--dry-run` works for 30B models without building them."""
    hidden, layers = cfg.hidden_size, cfg.num_layers
    q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attention = hidden * q_width + 2 * hidden * kv_width + q_width * hidden
    norms_per_layer = 2 * hidden + 2 * cfg.head_dim  # input/post-attention norms, q_norm, k_norm
    router = cfg.num_experts * hidden
    experts_per_layer = cfg.num_experts * 3 * hidden * cfg.moe_intermediate_size
    input_embedding = cfg.vocab_size * hidden
    lm_head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * hidden
    experts = layers * experts_per_layer
    total = (
        input_embedding
        + lm_head
        + layers * (attention + norms_per_layer + router + experts_per_layer)
        + hidden
    )
    routed_fraction = cfg.top_k / cfg.num_experts
    active_experts = layers * experts_per_layer * routed_fraction
    active = total - experts + active_experts
    output_matmul = cfg.vocab_size * hidden  # lm_head, or the tied embedding used as the output matmul
    active_matmul = output_matmul + layers * (attention + router) + active_experts
    return ParamCounts(
        total=int(total),
        active=int(active),
        active_matmul=int(active_matmul),
        experts=int(experts),
        embedding=int(input_embedding + lm_head),
    )


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 · N_active_matmul + 12 · n_layers · n_heads · head_dim · seq_len (forward + backward)."""
    counts = count_params(cfg)
    return 6 * counts.active_matmul + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def seed_flops_per_token(cfg: ModelConfig) -> float:
    """The seed validator's simpler 6 · N_active (embeddings included, no attention term)."""
    return 6 * count_params(cfg).active


def device_peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak bf16 FLOP/s of one device; None (shown as "n/a") when unknown, never a guess."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            return peak
    return None


def mfu(flops_per_tok: float, tokens_per_s_per_device: float, peak: float | None) -> float | None:
    if peak is None:
        return None
    return flops_per_tok * tokens_per_s_per_device / peak


def peak_memory_gib(device: torch.device) -> float:
    """Peak device memory allocated by torch on GPU; the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def format_count(count: float) -> str:
    """A count in human units: 30.53 B, 1.07 M, 53.2 K, 912."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count:.0f}"


def format_bytes(size: float) -> str:
    """A size in binary units: 61.0 GiB, 3.2 MiB, 512 B."""
    for scale, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(size) >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


def format_mfu(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


#: Bytes per token, layer and hidden unit that autocast keeps beyond bf16 activations where nothing casts a
#: layer's input (`train.precision=mixed` outside FSDP2): the residual stream and the input norms' outputs
#: stay fp32. Measured eager on a small Qwen3-MoE layer on the CPU (torch 2.13); an assumption for compiled
#: GPU layers until a mixed GPU run refits it.
FP32_RESIDUAL_BYTES = 8


def optimizer_states_per_param(train: TrainConfig) -> int:
    """Tensors of optimizer state per parameter: AdamW's two moments, SGD's momentum buffer if any."""
    return 2 if train.optimizer == "adamw" else (1 if train.momentum else 0)


def fsdp_gathered_params(counts: ParamCounts, num_layers: int, held_per_rank: float | None = None) -> float:
    """Weights FSDP2 holds gathered at once, for the compute-dtype copies of `train.precision=mixed`: the
    root's (embedding, final norm, lm_head: kept from its forward to its backward) and two decoder
    layers' (the one computing and the one prefetched). `held_per_rank`: what a rank holds before FSDP
    shards it (tensor parallelism's share; default the whole model)."""
    held = counts.total if held_per_rank is None else held_per_rank
    return counts.embedding + 2 * (held - counts.embedding) / num_layers


def estimate_memory_gib(
    cfg: ModelConfig,
    train: TrainConfig,
    params_per_rank: float,
    param_bytes: int,
    grad_params_per_rank: float | None = None,
    *,
    compute_bytes: int | None = None,
    compute_copy_params: float = 0.0,
    fp32_residual: bool = False,
) -> float:
    """Peak memory per rank: weights, gradients, optimizer state, one micro-batch's activations and
    logits. An estimate, not a promise. (Under accumulation the gradients of earlier micro-batches are
    alive while the next one's activations are; with one micro-batch this is slightly pessimistic.)

    The per-token coefficients were fitted to peaks measured on an H200 (BENCHMARKS.md, "memory
    estimate"): compiled layers keep about 10·H + 4·heads·head_dim + 6·k·I values per token and layer,
    eager ones 18·H + 4·heads·head_dim + 10·k·I; selective checkpointing (compiled) recomputes k·(H + I)
    + 2·H of them (measured on one layer on the CPU: 143 → 90 KB per token, BENCHMARKS.md; under `ep`, whose
    dispatch splits a layer into several graphs, the k·H expert-input copies stay); the loss keeps
    the logits and their gradient (plus fp32 copies when eager), of one chunk of tokens when
    train.loss_chunk_tokens chunks it (then also the head's weight and input gradients). Optimizer state is kept in the parameters' dtype. `grad_params_per_rank`
    (default: `params_per_rank`) counts the gradients a rank holds at its peak, which FSDP keeps
    unsharded while it defers their reduction to the last micro-batch.

    Weights, gradients and optimizer state take `param_bytes` each; activations and logits
    `compute_bytes` (default `param_bytes`: one dtype for both, as `bf16` and `fp32` train). Under
    `train.precision=mixed` (4 and 2) the compute runs on bf16 copies of `compute_copy_params` weights
    (`Strategy.compute_copy_params`: autocast's casts, alive from the forward that makes them to the
    backward that reads them, or the units FSDP2 holds gathered). `fp32_residual`: autocast without FSDP2
    keeps the residual stream and the input norms' outputs in fp32, `FP32_RESIDUAL_BYTES`·H more bytes
    per token and layer whose activations are kept, and under full checkpointing each layer's kept input
    in fp32 (the layers FSDP2 wraps get their inputs cast to bf16).
    """
    compute_bytes = param_bytes if compute_bytes is None else compute_bytes
    weights_and_state = params_per_rank * param_bytes * (1 + optimizer_states_per_param(train))
    compute_copies = compute_copy_params * compute_bytes
    tokens = train.micro_batch * train.seq_len
    checkpointing = checkpointing_mode(train.activation_checkpointing)
    attention = 4 * cfg.num_heads * cfg.head_dim
    if train.compile:
        per_token_layer = 10 * cfg.hidden_size + attention + 6 * cfg.top_k * cfg.moe_intermediate_size
        if checkpointing == "selective":  # recomputed: expert-input copies, SiLU·up, the two norm outputs
            per_token_layer -= cfg.top_k * (cfg.hidden_size + cfg.moe_intermediate_size) + 2 * cfg.hidden_size
    else:
        per_token_layer = 18 * cfg.hidden_size + attention + 10 * cfg.top_k * cfg.moe_intermediate_size
    layers_kept = 1 if checkpointing == "full" else cfg.num_layers
    activations = tokens * per_token_layer * compute_bytes * layers_kept
    if checkpointing == "full":  # each layer's input is kept for the recomputation
        activations += tokens * cfg.hidden_size * compute_bytes * cfg.num_layers
    if fp32_residual:
        activations += tokens * FP32_RESIDUAL_BYTES * cfg.hidden_size * layers_kept
        if checkpointing == "full":
            activations += tokens * cfg.hidden_size * (4 - compute_bytes) * cfg.num_layers
    logits_bytes = 2 * compute_bytes + (0 if train.compile else 8)
    if train.loss_chunk_tokens > 0:  # one chunk's logits, plus the head's gradients made in forward
        chunk = min(train.loss_chunk_tokens, tokens)
        head_gradients = (cfg.vocab_size * param_bytes + tokens * compute_bytes) * cfg.hidden_size
        logits = chunk * cfg.vocab_size * logits_bytes + head_gradients
    else:
        logits = tokens * cfg.vocab_size * logits_bytes
    grads = (params_per_rank if grad_params_per_rank is None else grad_params_per_rank) * param_bytes
    return (weights_and_state + grads + compute_copies + activations + logits) / 2**30
