"""NaiveEP: the expert-parallel design moectl's `ep` must beat (load with --strategy bench/naive_ep.py).

Every rank sees the SAME tokens (data-parallel degree 1) and holds E/ep experts. Each MoE layer routes
all tokens on every rank, runs the local experts in a Python loop (transformers' eager style) and
all-reduces the partial expert outputs. Attention and routing are therefore repeated ep times, and
every layer all-reduces a full activation: the costs the all-to-all design avoids.

Autograd, Megatron style: the tokens and router scores enter the expert region through an op that is
the identity forward and an all-reduce backward (each rank only sees its experts' share of their
gradient); the output leaves through an all-reduce forward, identity backward. Dense gradients then
come out identical on every rank and need no reduction; expert gradients are local.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moectl.config import ModelConfig, ParallelConfig, TrainConfig
from moectl.errors import UsageError
from moectl.expert_shards import gather_full_state, localize, shard_on_meta
from moectl.metrics import ParamCounts
from moectl.model import apply_layer_wrappers, decoder_layers
from moectl.moe_dispatch import route
from strategies.base import Materialize, SameDataOnEveryRank, Strategy


class _EnterExpertRegion(torch.autograd.Function):
    """Identity forward on (tokens, scores); all-reduce (sum) of both gradients backward.

    One node for both tensors, so every rank runs the two all-reduces in the same order.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scores: torch.Tensor, group: dist.ProcessGroup):
        ctx.group = group
        return x.view_as(x), scores.view_as(scores)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor, grad_scores: torch.Tensor):
        grad_x, grad_scores = grad_x.contiguous(), grad_scores.contiguous()
        dist.all_reduce(grad_x, group=ctx.group)
        dist.all_reduce(grad_scores, group=ctx.group)
        return grad_x, grad_scores, None


class _LeaveExpertRegion(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward (the gradient is already the same on every rank)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.mark_dirty(tensor)  # reduced in place, as transformers' eager loop accumulates in place
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class NaiveExpertParallelMoE(nn.Module):
    """Replicated routing, local experts in a loop, all-reduced output. Same `gate`/`experts` keys as HF."""

    def __init__(self, block: nn.Module, ep_group: dist.ProcessGroup, ep_rank: int):
        super().__init__()
        self.gate = block.gate
        self.experts = block.experts
        self.ep_group = ep_group
        self.first_expert = ep_rank * (block.experts.num_experts // ep_group.size())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        scores, expert_ids = route(self.gate, x)
        x, scores = _EnterExpertRegion.apply(x, scores, self.ep_group)
        experts = self.experts
        # Built from x so that the region's backward runs even on a rank whose experts got no token.
        partial = x * 0
        for local in range(experts.gate_up_proj.shape[0]):
            token_index, slot = torch.where(expert_ids == self.first_expert + local)
            if token_index.numel() == 0:
                continue
            gate, up = (x[token_index] @ experts.gate_up_proj[local].t()).chunk(2, dim=-1)
            out = (experts.act_fn(gate) * up) @ experts.down_proj[local].t()
            partial.index_add_(0, token_index, out * scores[token_index, slot, None])
        return _LeaveExpertRegion.apply(partial, self.ep_group).reshape(shape)


class NaiveEP(SameDataOnEveryRank, Strategy):
    name = "naive_ep"
    summary = "baseline: same tokens on every rank, local experts in a loop, expert output all-reduced"

    @classmethod
    def default_world_size(cls, parallel: ParallelConfig) -> int:
        return parallel.ep_size

    def validate(self, model: ModelConfig, train: TrainConfig) -> None:
        ep = self.parallel.ep_size
        if self.parallel.tp_size != 1 or self.parallel.dp_size not in (None, 1):
            raise UsageError("naive_ep has no tensor or data parallelism; drop --tp-size/--dp-size")
        if ep != self.world_size:
            raise UsageError(f"naive_ep: --ep-size {ep} must equal the world size {self.world_size}")
        if model.num_experts % ep:
            raise UsageError(f"naive_ep: --ep-size {ep} must divide model.num_experts {model.num_experts}")

    def params_per_rank(self, counts: ParamCounts) -> float:
        return counts.dense + counts.experts / self.parallel.ep_size

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        if self.world_size == 1:
            return None
        # "dp" of size 1: the loop's loss all-reduce must not add up W identical copies.
        return init_device_mesh(device_type, (1, self.world_size), mesh_dim_names=("dp", "ep"))

    def parallelize(self, model: nn.Module, materialize: Materialize, train: TrainConfig) -> nn.Module:
        if self.mesh is not None:
            for layer in decoder_layers(model):
                shard_on_meta(layer.mlp.experts, self.mesh["ep"])
                layer.mlp = NaiveExpertParallelMoE(
                    layer.mlp, self.mesh.get_group("ep"), self.mesh.get_local_rank("ep")
                )
        apply_layer_wrappers(model, train)
        materialize(model)
        for layer in decoder_layers(model):
            localize(layer.mlp.experts)
        return model

    def after_backward(self, model: nn.Module) -> None:
        # A rank whose experts got no token this step has no expert gradient; `single` has zeros
        # there (and applies weight decay), so give it zeros too.
        for layer in decoder_layers(model):
            for param in layer.mlp.experts.parameters():
                if param.grad is None:
                    param.grad = torch.zeros_like(param)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        group = None if self.mesh is None else self.mesh.get_group("ep")
        return gather_full_state(model, group, holds_rank0_experts=True)
