"""Expert-parallel building blocks: placing expert weights on their ranks and gathering the full model.
(The token dispatch that moves rows to those ranks is moectl/parallel/ep_dispatch.py.)

The experts' 3-D weights are sharded on dim 0 (experts) over the `ep` mesh axis. They are DTensors
only while the model is materialised: `materialize` then draws each full tensor with its *global*
shape (the same values `single` starts from) and keeps this rank's slice. Afterwards they become
plain local tensors: the forward needs only the local block (as one grouped GEMM operand, with no
DTensor dispatch on the way), and plain CUDA parameters keep the optimizer on its fused kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from math import comb

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from moectl.config import ModelConfig
from moectl.model.build import canonical_name
from moectl.parallel.full_state import full_tensors

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
#: Bytes that travel with each of a row's top-k choices in the dispatch: its local expert id (int32) and
#: router weight (the fp32 bits), one int32 tensor. In backward each weight's gradient travels, in the
#: parameters' dtype.
CHOICE_BYTES = 8


def ranks_per_token(num_experts: int, top_k: int, ep: int) -> float:
    """Expected distinct ranks among a token's top_k experts, experts chosen uniformly without repeats
    (1.99 / 3.63 / 5.34 of 2 / 4 / 8 ranks for Qwen3-30B-A3B's 8 of 128)."""
    local = num_experts // ep
    return ep * (1 - comb(num_experts - local, top_k) / comb(num_experts, top_k))


def exchange_rows(model: ModelConfig, tokens: int, ep: int) -> float:
    """Rows one rank sends to other ranks per MoE layer and micro-batch: each token goes once to every rank
    holding one of its experts, its own rank among them with probability ranks / ep."""
    if ep == 1:
        return 0.0
    return tokens * ranks_per_token(model.num_experts, model.top_k, ep) * (ep - 1) / ep


def exchange_bytes(model: ModelConfig, tokens: int, ep: int, row_bytes: int, weight_bytes: int) -> float:
    """Bytes one rank sends to other ranks per MoE layer and micro-batch, forward and backward, as
    summary.json's `a2a_bytes_per_step` counts them: the rows with their choices, the rows back, and in
    backward the returned rows' gradients and the rows' and weights' gradients. Rows travel in the compute
    dtype (`row_bytes` per value), the routing weights' gradients in the router's dtype (`weight_bytes`)."""
    row = model.hidden_size * row_bytes
    per_row = (row + model.top_k * CHOICE_BYTES) + row + row + (row + model.top_k * weight_bytes)
    return exchange_rows(model, tokens, ep) * per_row


def is_expert_key(name: str) -> bool:
    return canonical_name(name).endswith(tuple(f"mlp.experts.{weight}" for weight in EXPERT_WEIGHTS))


def shard_on_meta(module: nn.Module, ep_mesh: DeviceMesh | None) -> None:
    """Make the (meta) expert weights DTensors sharded on dim 0 over the 1-D `ep_mesh` (no memory used)."""
    if ep_mesh is None:
        return
    for weight in EXPERT_WEIGHTS:
        param = getattr(module, weight)
        sharded = distribute_tensor(param.data, ep_mesh, [Shard(0)], src_data_rank=None)
        setattr(module, weight, nn.Parameter(sharded, requires_grad=param.requires_grad))


def localize(module: nn.Module) -> None:
    """After materialising: replace the expert DTensors by their local blocks, as plain parameters."""
    for weight in EXPERT_WEIGHTS:
        param = getattr(module, weight)
        if isinstance(param, DTensor):
            setattr(
                module, weight, nn.Parameter(param.to_local().detach(), requires_grad=param.requires_grad)
            )


def gather_full_state(
    model: nn.Module, ep_group: dist.ProcessGroup | None, holds_rank0_experts: bool
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """The whole model with HF keys and global expert order, tensor by tensor: (name, full CPU tensor)
    on rank 0, (name, None) elsewhere (`moectl.parallel.full_state.full_tensors`); every rank iterates.

    DTensors (FSDP shards) are gathered with `full_tensor()` on every rank; the local expert blocks
    are then gathered over the EP group that contains rank 0 (`holds_rank0_experts`), in EP-rank
    order, which is global expert order. One tensor at a time, so no rank holds the full model.
    """
    is_rank0 = not dist.is_initialized() or dist.get_rank() == 0

    def gather_experts(name: str, full: torch.Tensor) -> torch.Tensor:
        if ep_group is None or not is_expert_key(name) or not holds_rank0_experts:
            return full
        blocks = [torch.empty_like(full) for _ in range(ep_group.size())] if is_rank0 else None
        dist.gather(full.contiguous(), blocks, dst=0, group=ep_group)
        return torch.cat(blocks) if is_rank0 else full

    return full_tensors(model, gather_experts)
