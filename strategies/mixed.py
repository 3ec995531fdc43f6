"""`mixed`: a 2-D mesh (dp, tp): tensor parallel inside each tp group, data parallel across groups.

Composed from the per-axis building blocks: tensor parallelism over `tp`, then across `dp` either
FSDP2 (`parallel.mixed_dp: fsdp`, the default: parameters, gradients and optimizer state sharded over
dp on top of the tp sharding) or replicas with a bucketed gradient all-reduce (`mixed_dp: ddp`).

Why `ddp` is a hand-written all-reduce and not `DistributedDataParallel`: DDP does not take DTensor
parameters; gradients summed once per step after the last micro-batch are all that is needed, and
gloo (the CPU backend) has no AVG op, so the gradients are summed and the loss is not scaled by dp.
"""

from __future__ import annotations

import torch
from torch import nn

from moectl.config import ModelConfig, ParallelConfig, TrainConfig
from moectl.errors import UsageError
from moectl.io.dcp_layouts import LocalBoxes
from moectl.model.build import apply_layer_wrappers, local_shard
from moectl.model.sizing import ParamCounts, fsdp_gathered_params
from moectl.parallel.data_parallel import all_reduce_gradients, fully_shard_layers, mixed_precision_policy
from moectl.parallel.dims import ParallelDims
from moectl.parallel.tensor_parallel import (
    apply_tensor_parallel,
    finish_partial_gradients,
    gate_up_checkpoint_view,
    gate_up_to_hf_order,
    tensor_parallel_params_per_rank,
    tensor_parallel_shard,
)
from moectl.strategy import Materialize, Strategy

DP_WRAPPERS = ("fsdp", "ddp")


class Mixed(Strategy):
    """dp × tp on a (dp, tp) mesh; tp groups are consecutive ranks (one host's fast links)."""

    name = "mixed"
    summary = "2-D dp × tp: tensor parallel inside groups, FSDP2 (or replicated dp) across them"

    @classmethod
    def parallel_dims(cls, parallel: ParallelConfig, world_size: int | None) -> ParallelDims:
        tp = parallel.tp_size
        if parallel.ep_size != 1:
            raise UsageError("mixed has no expert parallelism; drop --ep-size or pick --strategy ep")
        if parallel.mixed_dp not in DP_WRAPPERS:
            raise UsageError(
                f"parallel.mixed_dp must be one of {', '.join(DP_WRAPPERS)}, got {parallel.mixed_dp!r}"
            )
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
    def flags_for_world(cls, world_size: int, model: ModelConfig) -> list[str]:
        return ["--dp-size", "2", "--tp-size", str(max(1, world_size // 2))]

    def params_per_rank(self, counts: ParamCounts) -> float:
        per_tp_rank = tensor_parallel_params_per_rank(self.model_config, counts, self.dims.tp)
        return per_tp_rank / self.dims.dp if self.parallel.mixed_dp == "fsdp" else per_tp_rank

    def grad_params_per_rank(self, counts: ParamCounts, num_micro_batches: int) -> float:
        # FSDP2 keeps gradients unsharded over dp until the last micro-batch's reduce-scatter.
        if self.parallel.mixed_dp == "fsdp" and num_micro_batches > 1:
            return tensor_parallel_params_per_rank(self.model_config, counts, self.dims.tp)
        return self.params_per_rank(counts)

    def compute_copy_params(self, counts: ParamCounts) -> float:
        per_tp_rank = tensor_parallel_params_per_rank(self.model_config, counts, self.dims.tp)
        if self.parallel.mixed_dp != "fsdp":
            return per_tp_rank
        return fsdp_gathered_params(counts, self.model_config.num_layers, per_tp_rank)

    @property
    def loss_scale(self) -> float:
        # FSDP2 averages gradients over dp; the hand-made all-reduce sums them.
        return float(self.dims.dp) if self.parallel.mixed_dp == "fsdp" else 1.0

    def parallelize(self, model: nn.Module, materialize: Materialize, train: TrainConfig) -> nn.Module:
        apply_tensor_parallel(model, self.dims.mesh("tp"))
        apply_layer_wrappers(model, train)
        if self.parallel.mixed_dp == "fsdp":
            fully_shard_layers(model, self.dims.mesh("dp"), mixed_precision_policy(train))
        # Every rank fills its shard from the same deterministic source, so dp replicas start equal.
        materialize(model)
        return model

    def after_backward(self, model: nn.Module) -> None:
        finish_partial_gradients(model)  # Partial q_norm/k_norm gradients (a no-op under FSDP2)
        if self.parallel.mixed_dp == "ddp":
            all_reduce_gradients(list(model.parameters()), self.dims.group("dp"))

    def shard(self, name: str, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        return local_shard(param, tensor_parallel_shard(name, full, self.dims.tp))

    def checkpoint_tensor(self, param_name: str, tensor: torch.Tensor) -> torch.Tensor | LocalBoxes:
        return gate_up_checkpoint_view(param_name, tensor, self.dims.tp)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        state = super().full_state_dict(model)
        return None if state is None else gate_up_to_hf_order(state, self.dims.tp)
