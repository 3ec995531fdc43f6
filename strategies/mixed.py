"""`mixed`: a 2-D mesh (dp, tp): tensor parallel inside each tp group, data parallel across groups.

Composed from the per-axis building blocks: tensor parallelism over `tp`, then across `dp` either
FSDP2 (`parallel.mixed_dp: fsdp`, the default: parameters, gradients and optimizer state sharded over
dp on top of the tp sharding) or replicas with a bucketed gradient all-reduce (`mixed_dp: ddp`).

Why `ddp` is a hand-written all-reduce and not `DistributedDataParallel`: DDP does not take DTensor
parameters; gradients summed once per step after the last micro-batch are all that is needed, and
gloo (the CPU backend) has no AVG op, so the gradients are summed and the loss is not scaled by dp.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moectl.config import ModelConfig, ParallelConfig, TrainConfig
from moectl.errors import UsageError
from moectl.model.build import apply_layer_wrappers
from moectl.model.precision import Precision
from moectl.model.sizing import count_params
from moectl.parallel.cost import Collective, Exposure, StepCost, fsdp_bytes, ring
from moectl.parallel.data_parallel import all_reduce_gradients, fully_shard_layers, mixed_precision_policy
from moectl.parallel.dims import ParallelDims
from moectl.parallel.tensor_parallel import (
    TensorParallelState,
    apply_tensor_parallel,
    finish_partial_gradients,
    tensor_parallel_all_reduces,
    tensor_parallel_params_per_rank,
)
from moectl.strategy import Layout, Materialize, Strategy, StrategyOptions, option

DP_WRAPPERS = ("fsdp", "ddp")


class Mixed(TensorParallelState, Strategy):
    """dp × tp on a (dp, tp) mesh; tp groups are consecutive ranks (one host's fast links)."""

    name = "mixed"
    summary = "2-D dp × tp: tensor parallel inside groups, FSDP2 (or replicated dp) across them"

    @dataclass(frozen=True)
    class Options(StrategyOptions):
        dp: str = option(
            "fsdp",
            "what runs over the dp axis: fsdp (sharded) or ddp (replicas, gradients all-reduced)",
            key="mixed_dp",
        )

        def check(self) -> None:
            if self.dp not in DP_WRAPPERS:
                raise UsageError(
                    f"parallel.mixed_dp must be one of {', '.join(DP_WRAPPERS)}, got {self.dp!r}"
                )

        def label(self, name: str) -> str:
            return f"{name}/{self.dp}"

    options: Options

    @classmethod
    def parallel_dims(cls, parallel: ParallelConfig, world_size: int | None) -> ParallelDims:
        tp = parallel.tp_size
        if parallel.ep_size != 1:
            raise UsageError("mixed has no expert parallelism; drop --ep-size or pick --strategy ep")
        world = world_size or (parallel.dp_size or 1) * tp
        if world % tp:
            raise UsageError(
                f"mixed: the world size {world} is not a multiple of --tp-size {tp}; "
                f"set --nproc to a multiple of {tp} or give --dp-size"
            )
        if tp < 2:
            raise UsageError(
                f"mixed needs --tp-size 2 or more (got {tp}; without tensor parallelism it is fsdp or ddp); "
                "with --nproc N give --dp-size 2 --tp-size N/2"
            )
        dp = parallel.dp_size or world // tp
        return ParallelDims(world, dp=dp, tp=tp)

    @classmethod
    def layouts(cls, world_size: int, model: ModelConfig) -> list[Layout]:
        """dp 2 × tp N/2 first, then every other tp of 2 or more that divides the world, each over FSDP
        and over replicas."""
        degrees = [(world_size // tp, tp) for tp in range(2, world_size + 1) if world_size % tp == 0]
        degrees.sort(key=lambda pair: pair[0] != 2)
        return [
            Layout(world_size, dp_size=dp, tp_size=tp, options=cls.Options(dp=wrapper))
            for dp, tp in degrees
            for wrapper in DP_WRAPPERS
        ]

    def redundant(self) -> str | None:
        if self.dims.dp < 2:
            return f"mixed needs dp ≥ 2 and tp ≥ 2 (got dp {self.dims.dp}, tp {self.dims.tp}); use tp or fsdp"
        return None

    def step_cost(self, train: TrainConfig, ranks_per_node: int, precision: Precision) -> StepCost:
        model, dims = self.model_config, self.dims
        counts = count_params(model)
        per_tp_rank = tensor_parallel_params_per_rank(model, counts, dims.tp)
        num_micro, tokens = self.micro_batches(train), train.micro_batch * train.seq_len
        # The backward all-reduces carry the residual stream's gradients: in the compute dtype where FSDP2
        # casts each layer's input, in the weights' dtype under DDP (autocast keeps the stream fp32).
        backward_bytes = precision.compute_bytes if self.options.dp == "fsdp" else precision.param_bytes
        spans_tp = dims.spans_nodes("tp", ranks_per_node)
        collectives = [
            tensor_parallel_all_reduces(
                model, tokens, num_micro, dims.tp, spans_tp, precision.compute_bytes, backward_bytes
            )
        ]
        spans = dims.spans_nodes("dp", ranks_per_node)
        if self.options.dp == "ddp":
            if dims.dp > 1:  # by hand after backward: nothing left to overlap with
                sent = per_tp_rank * precision.param_bytes * ring(dims.dp)
                collectives.append(Collective("gradient all-reduce", sent, dims.dp, spans, Exposure.WAITED))
            return StepCost(params=per_tp_rank, grads=per_tp_rank, collectives=tuple(collectives))
        if dims.dp > 1:
            sent = fsdp_bytes(per_tp_rank, dims.dp, num_micro, precision)
            collectives.append(Collective("fsdp gather/scatter", sent, dims.dp, spans, Exposure.SHARDED))
        layer = (counts.total - counts.embedding) / model.num_layers
        return StepCost(
            params=per_tp_rank / dims.dp,
            grads=per_tp_rank,
            fsdp_unit=layer / dims.tp,
            fsdp_root=counts.embedding / dims.tp,
            collectives=tuple(collectives),
        )

    @property
    def loss_scale(self) -> float:
        # FSDP2 averages gradients over dp; the hand-made all-reduce sums them.
        return float(self.dims.dp) if self.options.dp == "fsdp" else 1.0

    def parallelize(self, model: nn.Module, materialize: Materialize, train: TrainConfig) -> nn.Module:
        apply_tensor_parallel(model, self.dims.mesh("tp"))
        apply_layer_wrappers(model, train)
        if self.options.dp == "fsdp":
            fully_shard_layers(model, self.dims.mesh("dp"), mixed_precision_policy(train))
        # Every rank fills its shard from the same deterministic source, so dp replicas start equal.
        materialize(model)
        return model

    def after_backward(self, model: nn.Module) -> None:
        finish_partial_gradients(model)  # Partial q_norm/k_norm gradients (a no-op under FSDP2)
        if self.options.dp == "ddp":
            all_reduce_gradients(list(model.parameters()), self.dims.group("dp"))
