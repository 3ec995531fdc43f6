"""`ep`: expert parallelism. Experts sharded on dim 0 over the `ep` axis, tokens moved by all-to-all.

Every rank reads its own data (the dense part is data parallel over all W ranks). In each MoE layer a
rank routes its own tokens, sends each (token, expert) row to the rank that owns the expert, runs its
E/ep experts as one grouped GEMM and gets the outputs back (moectl/parallel/ep_dispatch.py). With
W > ep the experts are replicated over W/ep groups: mesh (ep_replicate, ep) of shape (W/ep, ep), EP
groups on consecutive ranks (one node's NVLink).

Gradients are *sums* over ranks (the loop already divides the loss by the global token count, so
loss_scale is 1): the all-to-all backward sums every rank's contribution into the expert weights;
replicas of an expert and the replicated dense part are then all-reduced by hand in `after_backward`.
With `parallel.fsdp=true` FSDP2 does those reductions instead: the experts over their replicas, the
dense part of each decoder layer and the root over all ranks, all with sum reductions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard

from moectl.config import ModelConfig, ParallelConfig, TrainConfig
from moectl.errors import UsageError
from moectl.model.build import apply_layer_wrappers, decoder_layers
from moectl.model.sizing import ParamCounts, fsdp_gathered_params
from moectl.parallel.data_parallel import all_reduce_gradients, fully_shard_layers, mixed_precision_policy
from moectl.parallel.dims import ParallelDims
from moectl.parallel.ep_dispatch import DispatchStats, ExpertParallelMoE, GroupedExperts
from moectl.parallel.ep_recompute import checkpoint_contexts
from moectl.parallel.expert_parallel import gather_full_state, is_expert_key, localize, shard_on_meta
from moectl.parallel.gradients import grad_sum_of_squares
from moectl.strategy import Materialize, Strategy


class ExpertParallel(Strategy):
    name = "ep"
    summary = "expert parallel: experts sharded over ranks, tokens routed with all-to-all, grouped GEMM"

    @classmethod
    def parallel_dims(cls, parallel: ParallelConfig, world_size: int | None) -> ParallelDims:
        world = world_size or parallel.dp_size or parallel.ep_size
        if parallel.tp_size != 1:
            raise UsageError(f"ep has no tensor parallelism; drop --tp-size {parallel.tp_size}")
        if parallel.dp_size is not None and parallel.dp_size != world:
            raise UsageError(
                f"ep: every rank is a data-parallel rank, so --dp-size {parallel.dp_size} must equal "
                f"the world size {world}; drop --dp-size"
            )
        return ParallelDims(world, dp=world, ep=parallel.ep_size)

    @classmethod
    def flags_for_world(cls, world_size: int, model: ModelConfig) -> list[str]:
        ep = max(d for d in range(1, world_size + 1) if model.num_experts % d == 0 and world_size % d == 0)
        return ["--ep-size", str(ep)]

    def params_per_rank(self, counts: ParamCounts) -> float:
        if self.parallel.fsdp:
            return counts.total / self.dims.world_size
        return counts.dense + counts.experts / self.dims.ep

    def grad_params_per_rank(self, counts: ParamCounts, num_micro_batches: int) -> float:
        # FSDP2 keeps gradients unsharded (over its mesh) until the last micro-batch's reduce-scatter.
        if self.parallel.fsdp and num_micro_batches > 1:
            return counts.dense + counts.experts / self.dims.ep
        return self.params_per_rank(counts)

    def compute_copy_params(self, counts: ParamCounts) -> float:
        local_experts = counts.experts / self.dims.ep
        if not (self.parallel.fsdp and self.dims.world_size > 1):
            return counts.dense + local_experts
        dense = fsdp_gathered_params(counts, self.model_config.num_layers, counts.dense)
        # Experts FSDP2 shards over their replicas are gathered a layer at a time (and the next
        # prefetched); without replicas they stay plain and every layer's cast lives until its backward.
        if self.dims.ep_replicate > 1:
            return dense + 2 * local_experts / self.model_config.num_layers
        return dense + local_experts

    @property
    def loss_scale(self) -> float:
        return 1.0

    @property
    def _ep_mesh(self) -> DeviceMesh | None:
        return self.dims.mesh("ep") if self.dims.ep > 1 else None

    def parallelize(self, model: nn.Module, materialize: Materialize, train: TrainConfig) -> nn.Module:
        ep_mesh = self._ep_mesh
        ep_group = None if ep_mesh is None else ep_mesh.get_group()
        # With expert replicas, the count exchange spans the world: every rank sees every rank's load and
        # an overload stops all of them at the same layer (the other EP groups would hang otherwise).
        count_group = self.dims.group("dp") if self.dims.ep_replicate > 1 and ep_group is not None else None
        self.dispatch_stats = DispatchStats()
        for index, layer in enumerate(decoder_layers(model)):
            block = layer.mlp
            experts = GroupedExperts(
                block.experts.gate_up_proj, block.experts.down_proj, block.experts.act_fn
            )
            shard_on_meta(experts, ep_mesh)
            layer.mlp = ExpertParallelMoE(
                block.gate,
                experts,
                block.experts.num_experts,
                ep_group,
                self.dims.ep,
                num_chunks=self.parallel.ep_chunks,
                layer_index=index,
                max_rows_factor=self.parallel.ep_max_rows_factor,
                count_group=count_group,
                stats=self.dispatch_stats,
                compile=train.compile,
                fp8=train.fp8_experts,
            )
        apply_layer_wrappers(model, train, checkpoint_contexts)
        # Materialise before FSDP: the expert DTensors carry their global shape only until then. The
        # cost: with parallel.fsdp the dense part (~5 % of Qwen3-30B-A3B) is briefly whole on each rank.
        materialize(model)
        for layer in decoder_layers(model):
            localize(layer.mlp.experts)
        if self.parallel.fsdp and self.dims.world_size > 1:
            self._fully_shard(model, mixed_precision_policy(train))
        return model

    def _fully_shard(self, model: nn.Module, policy: MixedPrecisionPolicy) -> None:
        """Experts over their replicas (not at all without replicas: FSDP over one rank only copies),
        then every decoder layer and the root over all ranks; each layer prefetches the next explicitly."""
        layers = decoder_layers(model)
        experts = [layer.mlp.experts for layer in layers]
        expert_params = {param for module in experts for param in module.parameters()}
        shard_experts = self.dims.ep_replicate > 1
        if shard_experts:
            for module in experts:
                fully_shard(module, mesh=self.dims.mesh("ep_replicate"), mp_policy=policy)
        ignored = None if shard_experts else expert_params
        fully_shard_layers(model, self.dims.mesh("dp"), policy, sum_gradients=True, ignored_params=ignored)
        # FSDP2 gathers a layer when the host reaches it; the dispatch's per-layer host sync keeps the
        # host from running ahead, so without explicit prefetch every gather would wait in the open.
        for index, layer in enumerate(layers):
            upcoming = [layers[index + 1], experts[index + 1]] if index + 1 < len(layers) else []
            layer.set_modules_to_forward_prefetch([m for m in upcoming if isinstance(m, FSDPModule)])
        model.set_modules_to_forward_prefetch(
            [m for m in (layers[0], experts[0]) if isinstance(m, FSDPModule)]
        )
        mesh = self.dims.mesh("experts")  # its transpose states the checkpoint layout (below)
        self._checkpoint_mesh = DeviceMesh(
            mesh.device_type, mesh.mesh.t(), mesh_dim_names=("ep", "ep_replicate")
        )

    def step_metrics(self) -> dict[str, float]:
        """`a2a_bytes_per_step`: bytes this rank sent to other ranks in the token exchanges of the last
        step (rows, their choices and the gradients of both, forward and backward)."""
        return self.dispatch_stats.take()

    def after_backward(self, model: nn.Module) -> None:
        if self.dims.world_size == 1 or self.parallel.fsdp:
            return
        dense, experts = [], []
        for name, param in model.named_parameters():
            (experts if is_expert_key(name) else dense).append(param)
        all_reduce_gradients(dense, group=None)
        if self.dims.ep_replicate > 1:
            all_reduce_gradients(experts, group=self.dims.group("ep_replicate"))

    def grad_norm(self, model: nn.Module) -> torch.Tensor:
        """Dense gradients are replicated or FSDP DTensors (the default counts them once); expert blocks
        are this rank's slice of the ep axis, so their squares add up over the EP group."""
        dense, experts = [], []
        for name, param in model.named_parameters():
            (experts if is_expert_key(name) else dense).append(param)
        expert_squares = grad_sum_of_squares(experts)
        if self._ep_mesh is not None:
            dist.all_reduce(expert_squares, group=self._ep_mesh.get_group())
        return (grad_sum_of_squares(dense) + expert_squares).sqrt()

    def checkpoint_tensor(self, param_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Experts are plain local blocks [E/ep, ...]; DCP needs their global layout to reshard them.

        Without FSDP a block is expert slice p of the ep axis, the same on every replica. With FSDP
        each replica r further holds chunk r of that slice, i.e. global chunk p·R + r: sharded first
        over `ep`, then over `ep_replicate` (the expert mesh transposed).
        """
        if self.dims.world_size == 1 or not is_expert_key(param_name) or tensor.ndim == 0:
            return tensor  # (0-d: an optimizer's step count, the same on every rank)
        if isinstance(tensor, DTensor):  # FSDP2's shard over the replicas
            return DTensor.from_local(
                tensor.to_local(), self._checkpoint_mesh, [Shard(0), Shard(0)], run_check=False
            )
        return DTensor.from_local(tensor, self.dims.mesh("experts"), [Replicate(), Shard(0)], run_check=False)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        holds_rank0_experts = self.dims.local_rank("ep_replicate") == 0
        ep_group = None if self._ep_mesh is None else self._ep_mesh.get_group()
        return gather_full_state(model, ep_group, holds_rank0_experts)
