"""`ep`: expert parallelism. Experts sharded on dim 0 over the `ep` axis, tokens moved by all-to-all.

Every rank reads its own data (the dense part is data parallel over all W ranks). In each MoE layer a
rank routes its own tokens, sends each (token, expert) row to the rank that owns the expert, runs its
E/ep experts as one grouped GEMM and gets the outputs back (moectl/moe_dispatch.py). With W > ep the
experts are replicated over W/ep groups: mesh ("ep_replicate", "ep") of shape (W/ep, ep), EP groups
on consecutive ranks (one node's NVLink).

Gradients are *sums* over ranks (the loop already divides the loss by the global token count, so
loss_scale is 1): the all-to-all backward sums every rank's contribution into the expert weights;
replicas of an expert and the replicated dense part are then all-reduced by hand in `after_backward`.
With `parallel.fsdp=true` FSDP2 does those reductions instead: the dense part of each decoder layer
and the root over all ranks, the experts over their replicas, all with sum reductions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from moectl.config import ModelConfig, ParallelConfig, TrainConfig
from moectl.errors import UsageError
from moectl.expert_shards import all_reduce_grads, gather_full_state, is_expert_key, localize, shard_on_meta
from moectl.metrics import ParamCounts
from moectl.model import apply_layer_wrappers, decoder_layers
from moectl.moe_dispatch import ExpertParallelMoE, GroupedExperts
from strategies.base import Materialize, Strategy


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class ExpertParallel(Strategy):
    name = "ep"
    summary = "expert parallel: experts sharded over ranks, tokens routed with all-to-all, grouped GEMM"

    def __init__(self, parallel: ParallelConfig, world_size: int):
        super().__init__(parallel, world_size)
        self.ep_size = parallel.ep_size
        self.num_replicas = world_size // parallel.ep_size if world_size % parallel.ep_size == 0 else 0
        self.dp_mesh: DeviceMesh | None = None
        self.ckpt_mesh: DeviceMesh | None = None

    @classmethod
    def default_world_size(cls, parallel: ParallelConfig) -> int:
        return parallel.dp_size or parallel.ep_size

    def validate(self, model: ModelConfig, train: TrainConfig) -> None:
        ep, world = self.ep_size, self.world_size
        if self.parallel.tp_size != 1:
            raise UsageError(f"ep has no tensor parallelism; drop --tp-size {self.parallel.tp_size}")
        if self.parallel.dp_size is not None and self.parallel.dp_size != world:
            raise UsageError(
                f"ep: every rank is a data-parallel rank, so --dp-size {self.parallel.dp_size} must equal "
                f"the world size {world}; drop --dp-size"
            )
        if world % ep:
            raise UsageError(
                f"ep: --ep-size {ep} must divide the world size {world}; use --nproc {ep} (or a multiple of {ep})"
            )
        if model.num_experts % ep:
            raise UsageError(
                f"ep: --ep-size {ep} must divide model.num_experts {model.num_experts}; "
                f"use one of {', '.join(map(str, _divisors(model.num_experts)))}"
            )

    def params_per_rank(self, counts: ParamCounts) -> float:
        if self.parallel.fsdp:
            return counts.total / self.world_size
        return counts.dense + counts.experts / self.ep_size

    # ---- building ------------------------------------------------------------------------------
    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        if self.world_size == 1:
            return None
        mesh = init_device_mesh(
            device_type, (self.num_replicas, self.ep_size), mesh_dim_names=("ep_replicate", "ep")
        )
        if self.parallel.fsdp:
            self.dp_mesh = init_device_mesh(device_type, (self.world_size,), mesh_dim_names=("dp",))
            self.ckpt_mesh = DeviceMesh(device_type, mesh.mesh.t(), mesh_dim_names=("ep", "ep_replicate"))
        return mesh

    @property
    def _ep_group(self):
        return None if self.mesh is None or self.ep_size == 1 else self.mesh.get_group("ep")

    def parallelize(self, model: nn.Module, materialize: Materialize, train: TrainConfig) -> nn.Module:
        ep_mesh = None if self.mesh is None or self.ep_size == 1 else self.mesh["ep"]
        for layer in decoder_layers(model):
            block = layer.mlp
            experts = GroupedExperts(
                block.experts.gate_up_proj, block.experts.down_proj, block.experts.act_fn
            )
            shard_on_meta(experts, ep_mesh)
            layer.mlp = ExpertParallelMoE(
                block.gate, experts, block.experts.num_experts, self._ep_group, self.ep_size
            )
        apply_layer_wrappers(model, train)
        # Materialise before FSDP: the expert DTensors carry their global shape only until then. The
        # cost: with parallel.fsdp the dense part (~5 % of Qwen3-30B-A3B) is briefly whole on each rank.
        materialize(model)
        for layer in decoder_layers(model):
            localize(layer.mlp.experts)
        if self.parallel.fsdp and self.mesh is not None:
            self._fully_shard(model)
        return model

    def _fully_shard(self, model: nn.Module) -> None:
        """FSDP2: experts over their replicas (the ep_replicate axis), dense layers and root over all ranks."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        for layer in decoder_layers(model):
            fully_shard(layer.mlp.experts, mesh=self.mesh["ep_replicate"])
            fully_shard(layer, mesh=self.dp_mesh)
        fully_shard(model, mesh=self.dp_mesh)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # Sums, not averages: the loop's loss normalisation already makes the sum exact.
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)

    # ---- the loop's hooks ----------------------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        return 1.0

    def loss_group(self):
        return None  # every rank holds distinct tokens: the global loss sums over the whole world

    def after_backward(self, model: nn.Module) -> None:
        if self.mesh is None or self.parallel.fsdp:
            return
        dense, experts = [], []
        for name, param in model.named_parameters():
            (experts if is_expert_key(name) else dense).append(param)
        all_reduce_grads(dense, group=None)
        if self.num_replicas > 1:
            all_reduce_grads(experts, group=self.mesh.get_group("ep_replicate"))

    def checkpoint_tensor(self, param_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Experts are plain local blocks [E/ep, ...]; DCP needs their global layout to reshard them.

        Without FSDP a block is expert slice p of the ep axis, the same on every replica. With FSDP
        each replica r further holds chunk r of that slice, i.e. global chunk p·R + r: sharded first
        over `ep`, then over `ep_replicate` (the transposed mesh built in build_mesh).
        """
        if self.mesh is None or not is_expert_key(param_name):
            return tensor
        if isinstance(tensor, DTensor):  # FSDP2's shard over the replicas
            return DTensor.from_local(
                tensor.to_local(), self.ckpt_mesh, [Shard(0), Shard(0)], run_check=False
            )
        return DTensor.from_local(tensor, self.mesh, [Replicate(), Shard(0)], run_check=False)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        holds_rank0_experts = self.mesh is None or self.mesh.get_coordinate()[0] == 0
        return gather_full_state(model, self._ep_group, holds_rank0_experts)
