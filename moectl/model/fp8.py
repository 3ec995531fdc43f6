"""FP8 training: GEMMs in float8 with rowwise scales, through torchao; weights, gradients, optimizer
state and everything between the GEMMs stay as they were (fp32 weights, gradients and optimizer state
with bf16 compute under train.precision=mixed: a Float8Linear quantises its fp32 master weight directly
and gives it an fp32 gradient; all bf16 under bf16).

`train.fp8`: each decoder layer's attention q and o projections run as torchao's `Float8Linear` (rowwise
recipe: every row of an operand gets its own power-of-two scale, computed on the fly). Only those two:
a Float8Linear quantises its input itself, and for k and v (2048 → 512 in Qwen3-30B-A3B) reading and
casting the input costs about what FP8 saves on a GEMM a quarter of q's size. The router (its scores
decide the routing), the lm_head and loss (the logits' precision is the loss's), attention and norms stay
bf16.

`train.fp8_experts`: under a strategy that runs the experts as one grouped GEMM (`ep`), those GEMMs run as torchao's rowwise FP8 grouped GEMM (the
dispatch pads each expert's group to 16 rows for it). At Qwen3-30B-A3B's expert shapes (hidden 2048,
width 768) its quantisation passes cost more than the faster GEMMs save (BENCHMARKS.md, "FP8"), so it is
off unless asked for.

Hopper-class GPUs (compute capability 8.9 or newer) only; `check` refuses anything else before a worker
starts.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from moectl.config import TrainConfig
from moectl.errors import UsageError

if TYPE_CHECKING:
    from moectl.strategy import Strategy

MIN_CAPABILITY = (8, 9)
#: Where in a decoder layer Linear modules run in FP8 (fqn fragments); the rest stay bf16.
FP8_LINEARS = ("self_attn.q_proj", "self_attn.o_proj")


def check(train: TrainConfig, on_gpu: bool, dtype: torch.dtype, strategy: Strategy) -> None:
    """Refuse `train.fp8` / `train.fp8_experts` where they cannot run under `strategy` (its degrees and
    what it states it runs), with the fix, before anything starts (`dtype`: the run's compute dtype)."""
    flag = "train.fp8" if train.fp8 else "train.fp8_experts"
    if train.fp8_experts and not strategy.grouped_experts:
        raise UsageError(
            f"train.fp8_experts runs the experts' grouped GEMMs; --strategy {strategy.name} runs transformers' "
            "experts: use --strategy ep or drop --set train.fp8_experts=true"
        )
    if strategy.dims.tp > 1:
        raise UsageError(
            f"{flag} does not run under tensor parallelism (--tp-size > 1); use --strategy ep, fsdp, ddp or "
            f"single, or drop --set {flag}=true"
        )
    if not on_gpu:
        raise UsageError(
            f"{flag} needs NVIDIA GPUs of compute capability 8.9 or newer (Ada, Hopper); this run is on the "
            f"CPU: drop --set {flag}=true"
        )
    if dtype != torch.bfloat16:
        raise UsageError(
            f"{flag} needs bf16 compute, and train.precision=fp32 computes in {str(dtype).removeprefix('torch.')}: "
            "use --set train.precision=mixed (or bf16)"
        )
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        raise UsageError(
            f"{flag} needs compute capability 8.9 or newer; this GPU has {capability[0]}.{capability[1]}: "
            f"drop --set {flag}=true"
        )
    try:
        import torchao.float8  # noqa: F401
        import torchao.prototype.moe_training.fp8_grouped_mm  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"{flag} needs torchao ({exc}): pip install 'moectl[fp8]'") from exc


def is_fp8_linear(module: nn.Module, fqn: str) -> bool:
    """Which Linear modules `convert_linears` swaps: the attention q and o projections, when FP8 can hold
    their shapes (both dimensions multiples of 16)."""
    return (
        isinstance(module, nn.Linear)
        and fqn.endswith(FP8_LINEARS)
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def convert_linears(model: nn.Module, emulate: bool = False) -> int:
    """Swap the attention q and o projections for torchao's Float8Linear (rowwise scales), in place, before any
    other wrapper (the wrap order's first step); parameter names and values are unchanged. `emulate`
    runs the same quantisation with high-precision GEMMs (any device: tests). Returns how many."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name("rowwise")
    if emulate:
        config = dataclasses.replace(config, emulate=True)
    names = {fqn for fqn, module in model.named_modules() if is_fp8_linear(module, fqn)}
    convert_to_float8_training(model, config=config, module_filter_fn=lambda module, fqn: fqn in names)
    return len(names)


def grouped_mm_fp8(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`grouped_mm_kernel` in FP8: x [R, K] row-major (bf16), weight [G, N, K] seen as column-major
    [G, K, N], int32 cumulative `offsets` whose groups start at multiples of 16 rows. Rowwise scales for
    x and the output gradient, per expert and column for the weight; output bf16."""
    from torchao.prototype.moe_training.fp8_grouped_mm import _to_fp8_rowwise_then_scaled_grouped_mm

    return _to_fp8_rowwise_then_scaled_grouped_mm(
        x, weight.transpose(-2, -1), offsets, out_dtype=torch.bfloat16, pad_token_groups_for_grouped_mm=False
    )
