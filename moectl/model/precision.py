"""Training precision (`train.precision`): which dtype the weights are kept in and which the GPUs compute in.

- `fp32`: weights, gradients, optimizer state and compute in float32 (the CPU default).
- `mixed`: float32 master weights, gradients and optimizer state; matmuls, attention, activations and
  `ep`'s token exchanges in bf16 (the GPU default, as torchtitan and Megatron train). A gradient comes out
  of the bf16 compute as the float32 gradient of its float32 weight, so accumulation over micro-batches
  and every reduction over ranks add float32 numbers, and an update far smaller than a weight's bf16
  spacing (an AdamW step of 1e-5 on a weight of 0.02, whose bf16 neighbours lie 1.2e-4 apart) still
  moves the weight.
- `bf16`: everything in bf16, as moectl trained on GPUs before: the cheapest, but such small updates
  round away and the weight never changes.

How `mixed` computes in bf16, per path (checked on the CPU with torch 2.13 by tests/test_precision.py,
which records the dtype of every GEMM, grouped GEMM and attention call of a training step):

- FSDP2-managed parameters (`fsdp`, `mixed` over FSDP, `ep` with `parallel.fsdp`) follow FSDP2's
  `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32)`: the float32 shards are cast to bf16
  before the all-gather, the forward and backward see bf16 weights, and gradients are cast to float32
  before the reduce-scatter (and accumulated in float32 across micro-batches).
- Every micro-batch's forward runs under `torch.autocast(bf16)`: matmuls and attention take bf16 copies
  of float32 weights, and gradients flow back through the casts as float32, so DDP's and the hand-made
  all-reduces sum float32. Elementwise work stays in its inputs' dtype: the residual stream and the
  input norms' outputs stay float32 outside FSDP. The cache of the casts is off: every weight is used
  once per forward, and with activation checkpointing the recomputation casts again instead of keeping
  every layer's copy until the forward ends.
- Where autocast does not reach, moectl casts: transformers' experts run on bf16 casts of their weights
  (`Precision.apply_to`: `grouped_mm` is no autocast op); `ep` casts its rows before the token exchange
  and its experts' weights before the grouped GEMM (`compute_dtype`); the chunked lm_head + loss casts
  its input (its GEMMs write into given outputs, which autocast skips).
- The router's logits are float32 under autocast (moectl/model/routing.py says why).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import torch
from torch import nn

from moectl.config import PRECISIONS

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Precision:
    """A resolved `train.precision`."""

    name: str  # bf16, mixed or fp32
    param_dtype: torch.dtype  # weights, their gradients and optimizer state: what checkpoints hold
    compute_dtype: torch.dtype  # matmuls, attention, activations, token exchanges

    @property
    def param_bytes(self) -> int:
        """Bytes of a weight, its gradient and an optimizer value; of a gradient reduction over ranks."""
        return self.param_dtype.itemsize

    @property
    def compute_bytes(self) -> int:
        """Bytes of an activation, a logit, a token row exchanged (ep) and a weight FSDP2 gathers."""
        return self.compute_dtype.itemsize

    @property
    def casts(self) -> bool:
        """Whether the compute runs on copies of the weights in another dtype (`mixed`)."""
        return self.param_dtype != self.compute_dtype

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """The context a micro-batch's forward runs in: autocast to the compute dtype under `mixed`."""
        if not self.casts:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.compute_dtype, cache_enabled=False)

    def around(self, function: Callable[P, R], device_type: str) -> Callable[P, R]:
        """`function` run under `autocast(device_type)`; itself where nothing is cast."""
        if not self.casts:
            return function

        def in_compute_dtype(*args: P.args, **kwargs: P.kwargs) -> R:
            with self.autocast(device_type):
                return function(*args, **kwargs)

        return in_compute_dtype

    def apply_to(self, model: nn.Module) -> None:
        """Under `mixed`, make transformers' experts (on the meta-device model, before any wrapper) run on
        bf16 casts of their weights (`torch.func.functional_call`): their grouped GEMM (`grouped_mm`) is
        not an autocast op, and transformers casts its input to the weights' dtype, so fp32 master weights
        would make the experts compute in fp32."""
        if not self.casts:
            return
        for module in model.modules():
            if type(module).__name__.endswith("MoeExperts"):
                module.forward = _on_weight_casts(module)

    def describe(self) -> str:
        """One line for the console and the dry-run."""
        if self.casts:
            return f"{self.name}: {_short(self.param_dtype)} weights, gradients and optimizer state, {_short(self.compute_dtype)} compute"
        return f"{self.name}: everything in {_short(self.param_dtype)}"


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype).removeprefix("torch."))


def _on_weight_casts(module: nn.Module) -> Callable:
    """`module.forward` run on casts of its own weights to the compute dtype of its first input (under
    autocast), gradients flowing back to the weights through the casts; as it is where they match (the
    weights already bf16: FSDP2's gathered ones, or `bf16`; or no autocast)."""
    forward = module.forward
    names = [name for name, _ in module.named_parameters(recurse=False)]

    def forward_on_casts(hidden_states: torch.Tensor, *args, **kwargs):
        dtype = compute_dtype(hidden_states)
        if all(getattr(module, name).dtype == dtype for name in names):  # also the call below, re-entered
            return forward(hidden_states, *args, **kwargs)
        casts = {name: getattr(module, name).to(dtype) for name in names}
        return torch.func.functional_call(module, casts, (hidden_states.to(dtype), *args), kwargs)

    return forward_on_casts


def resolve_precision(name: str, on_gpu: bool) -> Precision:
    """`train.precision` as dtypes: `auto` is `mixed` on GPUs and `fp32` on CPUs."""
    if name == "auto":
        name = "mixed" if on_gpu else "fp32"
    if name == "bf16":
        return Precision(name, torch.bfloat16, torch.bfloat16)
    if name == "mixed":
        return Precision(name, torch.float32, torch.bfloat16)
    if name == "fp32":
        return Precision(name, torch.float32, torch.float32)
    raise ValueError(f"unknown precision {name!r}; one of {', '.join(PRECISIONS)}")


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype `tensor`'s device computes in here: autocast's when it is on, else the tensor's own."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type) and tensor.is_floating_point():
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def save_dtype(save: str, model_dtype: str) -> torch.dtype:
    """The dtype the final HF model is written in: `train.save_dtype`, where `auto` is the model's own
    (`model.dtype`: its config.json's `dtype`, bf16 for Qwen3's releases)."""
    return getattr(torch, model_dtype if save == "auto" else save)
