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

Its options: `parallel.fsdp`, `parallel.ep_chunks`, `parallel.ep_max_rows_factor` (`Options` below).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard

from moectl.config import ModelConfig, ParallelConfig, TrainConfig, checkpointing_mode
from moectl.errors import UsageError
from moectl.model.build import apply_layer_wrappers, decoder_layers
from moectl.model.precision import Precision
from moectl.model.sizing import count_params, fsdp_gathered_params
from moectl.parallel.cost import Collective, Exposure, StepCost, fsdp_bytes, ring
from moectl.parallel.data_parallel import all_reduce_gradients, fully_shard_layers, mixed_precision_policy
from moectl.parallel.dims import ParallelDims
from moectl.parallel.ep_dispatch import DispatchStats, ExpertParallelMoE, GroupedExperts
from moectl.parallel.ep_recompute import checkpoint_contexts
from moectl.parallel.expert_parallel import (
    CHOICE_BYTES,
    exchange_bytes,
    gather_full_state,
    is_expert_key,
    localize,
    ranks_per_token,
    shard_on_meta,
)
from moectl.parallel.gradients import grad_sum_of_squares
from moectl.strategy import Layout, Materialize, Strategy, StrategyOptions, autocast_copy_params, option


class ExpertParallel(Strategy):
    name = "ep"
    summary = "expert parallel: experts sharded over ranks, tokens routed with all-to-all, grouped GEMM"
    grouped_experts = True

    @dataclass(frozen=True)
    class Options(StrategyOptions):
        fsdp: bool = option(False, "also shard the dense parameters and the expert replicas with FSDP2")
        chunks: int = option(
            1, "token chunks whose exchanges overlap each other's expert compute", key="ep_chunks"
        )
        max_rows_factor: float | None = option(
            None,
            "stop every rank when one would receive more than this × its balanced share of (token, "
            "expert) rows; unset: when they need more memory than its GPU has free",
            key="ep_max_rows_factor",
        )

        def check(self) -> None:
            if not self.chunks > 0:
                raise UsageError(f"parallel.ep_chunks must be positive, got {self.chunks}")
            if self.max_rows_factor is not None and not self.max_rows_factor >= 1:
                raise UsageError(
                    "parallel.ep_max_rows_factor must be positive and at least 1 (× a rank's balanced "
                    f"share), got {self.max_rows_factor:g}; drop it or give 1 or more"
                )

        def label(self, name: str) -> str:
            return f"{name}+fsdp" if self.fsdp else name

    options: Options

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
    def layouts(cls, world_size: int, model: ModelConfig) -> list[Layout]:
        """Every ep size of 2 or more that divides the world, the largest dividing the experts first
        (ep 1 when none does), each without and with FSDP. On one GPU, ep 1: the dispatch's grouped GEMM
        with nothing to exchange, measured faster than `single` there (BENCHMARKS.md)."""
        if world_size == 1:
            return [Layout(1, ep_size=1, options=cls.Options())]
        sizes = [d for d in range(world_size, 1, -1) if world_size % d == 0]
        sizes.sort(key=lambda ep: model.num_experts % ep != 0)
        if world_size > 1 and not any(model.num_experts % ep == 0 for ep in sizes):
            sizes.insert(0, 1)
        return [
            Layout(world_size, ep_size=ep, options=cls.Options(fsdp=f)) for ep in sizes for f in (False, True)
        ]

    def step_cost(self, train: TrainConfig, ranks_per_node: int, precision: Precision) -> StepCost:
        model, dims = self.model_config, self.dims
        counts = count_params(model)
        num_micro = self.micro_batches(train)
        held = counts.dense + counts.experts / dims.ep
        collectives = []
        # The dense part is replicated over all ranks, each expert over the EP groups: both are reduced
        # over their replicas, by FSDP2 or by hand after backward (nothing left to overlap with).
        for params, group, axis in (
            (counts.dense, dims.world_size, "dp"),
            (counts.experts / dims.ep, dims.ep_replicate, "ep_replicate"),
        ):
            spans = dims.spans_nodes(axis, ranks_per_node)
            if self.options.fsdp:
                sent = fsdp_bytes(params, group, num_micro, precision)
                collectives.append(Collective("fsdp gather/scatter", sent, group, spans, Exposure.SHARDED))
            else:
                sent = params * precision.param_bytes * ring(group)
                collectives.append(Collective("gradient all-reduce", sent, group, spans, Exposure.WAITED))
        cost = StepCost(params=held, grads=held, collectives=tuple(collectives))
        if dims.ep > 1:
            cost = self._exchange_cost(cost, train, num_micro, ranks_per_node, precision)
        if self.options.fsdp:  # every parameter sharded; gradients stay whole until the last micro-batch
            layer = (counts.total - counts.embedding) / model.num_layers
            cost = dataclasses.replace(
                cost,
                params=counts.total / dims.world_size,
                fsdp_unit=layer / dims.ep,
                fsdp_root=counts.embedding / dims.tp,
            )
        return cost

    def _exchange_cost(
        self, cost: StepCost, train: TrainConfig, num_micro: int, ranks_per_node: int, precision: Precision
    ) -> StepCost:
        """The token exchanges: their buffers, the rows recorded for recompute, the dispatch work, the
        all-to-alls (dispatch and return, forward and backward: each token once to every other rank that
        holds one of its experts, with its choices; one row back per (token, rank); nothing overlaps).
        Rows travel in the compute dtype; the routing weights are in the router's dtype, which is the
        weights' (fp32 under `mixed`, whose router logits are fp32: moectl/model/routing.py)."""
        row_bytes, weight_bytes = precision.compute_bytes, precision.param_bytes
        model, ep = self.model_config, self.dims.ep
        tokens = train.micro_batch * train.seq_len
        rows = tokens * ranks_per_token(model.num_experts, model.top_k, ep)
        # One layer's exchange buffers at their fullest, when the expert rank starts the return trip: the
        # rows sent (with their choices) and received (with theirs), the expert rank's results for them,
        # and the buffer the returned rows land in.
        row = model.hidden_size * row_bytes
        buffer_bytes = 4 * rows * row + 2 * rows * model.top_k * CHOICE_BYTES
        recorded_bytes = 0.0
        if checkpointing_mode(train.activation_checkpointing) == "full":
            # Each layer records what it received (rows, weights, expert ids) for its recompute to replay.
            recorded = model.hidden_size * row_bytes + model.top_k * (weight_bytes + 4)
            recorded_bytes = model.num_layers * rows * recorded
        sent = num_micro * model.num_layers * exchange_bytes(model, tokens, ep, row_bytes, weight_bytes)
        spans = self.dims.spans_nodes("ep", ranks_per_node)
        return dataclasses.replace(
            cost,
            buffer_bytes=buffer_bytes,
            recorded_bytes=recorded_bytes,
            dispatch_pairs=num_micro * model.num_layers * (tokens * model.top_k),
            collectives=(Collective("all-to-all", sent, ep, spans, Exposure.ALL_TO_ALL), *cost.collectives),
        )

    def compute_copy_params(self, cost: StepCost, train: TrainConfig) -> float:
        counts, layers = count_params(self.model_config), self.model_config.num_layers
        local_experts = counts.experts / self.dims.ep
        if not (self.options.fsdp and self.dims.world_size > 1):
            return autocast_copy_params(counts.dense + local_experts, counts.embedding, layers, train)
        dense = fsdp_gathered_params(counts, layers, counts.dense)
        # Experts FSDP2 shards over their replicas are gathered a layer at a time (and the next
        # prefetched); without replicas they stay plain and every layer's cast lives until its backward.
        if self.dims.ep_replicate > 1:
            return dense + 2 * local_experts / layers
        return dense + autocast_copy_params(local_experts, 0.0, layers, train)

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
                num_chunks=self.options.chunks,
                layer_index=index,
                max_rows_factor=self.options.max_rows_factor,
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
        if self.options.fsdp and self.dims.world_size > 1:
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
        if self.dims.world_size == 1 or self.options.fsdp:
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

    def full_state_dict(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor | None]]:
        holds_rank0_experts = self.dims.local_rank("ep_replicate") == 0
        ep_group = None if self._ep_mesh is None else self._ep_mesh.get_group()
        return gather_full_state(model, ep_group, holds_rank0_experts)
