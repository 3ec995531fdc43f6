"""NaiveEP: the seed-style expert-parallel design moectl's `ep` must beat — and the worked example of a
third-party strategy plugin (README, "Writing a strategy"). It imports only moectl's public core.

Every rank sees the SAME tokens (data-parallel degree 1) and holds E/ep experts. Each MoE layer routes
all tokens on every rank, runs the local experts in a Python loop (transformers' eager style) and
all-reduces the partial expert outputs. Attention and routing are therefore repeated ep times, and
every layer all-reduces a full activation: the costs the all-to-all design avoids.

Autograd, Megatron style: the tokens and router scores enter the expert region through f, the
identity forward and an all-reduce backward (each rank only sees its experts' share of their
gradient); the output leaves through g, an all-reduce forward and identity backward
(moectl/parallel/tensor_parallel.py). Dense gradients then
come out identical on every rank and need no reduction; expert gradients are local.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from moectl.config import ModelConfig, ParallelConfig, TrainConfig
from moectl.errors import UsageError
from moectl.model.build import apply_layer_wrappers, decoder_layers
from moectl.parallel.dims import ParallelDims
from moectl.parallel.ep_dispatch import route
from moectl.parallel.expert_parallel import gather_full_state, is_expert_key, localize, shard_on_meta
from moectl.parallel.gradients import grad_sum_of_squares
from moectl.parallel.tensor_parallel import copy_to_parallel_region, reduce_from_parallel_region
from moectl.strategy import Layout, Materialize, Strategy


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
        x = copy_to_parallel_region(x, self.ep_group)
        scores = copy_to_parallel_region(scores, self.ep_group)
        experts = self.experts
        # Built from x and the scores so that both f backwards (all-reduces) run on every rank, also on
        # one whose experts got no token.
        partial = x * 0 + scores.sum() * 0
        for local in range(experts.gate_up_proj.shape[0]):
            token_index, slot = torch.where(expert_ids == self.first_expert + local)
            if token_index.numel() == 0:
                continue
            gate, up = (x[token_index] @ experts.gate_up_proj[local].t()).chunk(2, dim=-1)
            out = (experts.act_fn(gate) * up) @ experts.down_proj[local].t()
            partial.index_add_(0, token_index, out * scores[token_index, slot, None])
        return reduce_from_parallel_region(partial, self.ep_group).reshape(shape)


class NaiveEP(Strategy):
    name = "naive_ep"
    summary = "baseline: same tokens on every rank, local experts in a loop, expert output all-reduced"

    @classmethod
    def parallel_dims(cls, parallel: ParallelConfig, world_size: int | None) -> ParallelDims:
        ep = parallel.ep_size
        if parallel.tp_size != 1 or parallel.dp_size not in (None, 1):
            raise UsageError("naive_ep has no tensor or data parallelism; drop --tp-size/--dp-size")
        if world_size not in (None, ep):
            raise UsageError(f"naive_ep: --ep-size {ep} must equal the world size {world_size}")
        # Every rank reads the same data (dp 1) and holds its own experts.
        return ParallelDims(ep, dp=1, ep=ep)

    @classmethod
    def layouts(cls, world_size: int, model: ModelConfig) -> list[Layout]:
        # It states no `step_cost`: `moectl plan` lists it as having no cost model.
        return [Layout(world_size, ep_size=world_size)] if world_size > 1 else []

    @property
    def loss_scale(self) -> float:
        return 1.0

    def parallelize(self, model: nn.Module, materialize: Materialize, train: TrainConfig) -> nn.Module:
        if self.dims.world_size > 1:
            ep_mesh = self.dims.mesh("ep")
            for layer in decoder_layers(model):
                shard_on_meta(layer.mlp.experts, ep_mesh)
                layer.mlp = NaiveExpertParallelMoE(layer.mlp, ep_mesh.get_group(), ep_mesh.get_local_rank())
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

    def grad_norm(self, model: nn.Module) -> torch.Tensor:
        # Dense gradients are the same on every rank; each rank's experts are its own slice.
        dense, experts = [], []
        for name, param in model.named_parameters():
            (experts if is_expert_key(name) else dense).append(param)
        expert_squares = grad_sum_of_squares(experts)
        if self.dims.world_size > 1:
            dist.all_reduce(expert_squares, group=self.dims.group("ep"))
        return (grad_sum_of_squares(dense) + expert_squares).sqrt()

    def full_state_dict(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor | None]]:
        return gather_full_state(model, self.dims.group("ep"), holds_rank0_experts=True)
