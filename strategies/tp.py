"""`tp`: DTensor tensor parallelism over attention heads and the experts' intermediate dimension.

Every tp rank reads the same sequences (data-parallel degree 1); the building blocks, and why the
parameters are DTensors, are in moectl/parallel/tensor_parallel.py.
"""

from __future__ import annotations

import torch
from torch import nn

from moectl.config import ModelConfig, ParallelConfig, TrainConfig
from moectl.errors import UsageError
from moectl.io.dcp_layouts import LocalBoxes
from moectl.model.build import apply_layer_wrappers, local_shard
from moectl.model.sizing import ParamCounts
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


class TensorParallel(Strategy):
    name = "tp"
    summary = "tensor parallel (DTensor): attention heads and expert intermediate width split over tp"

    @classmethod
    def parallel_dims(cls, parallel: ParallelConfig, world_size: int | None) -> ParallelDims:
        tp = parallel.tp_size
        if parallel.ep_size != 1:
            raise UsageError("tp has no expert parallelism; drop --ep-size or pick --strategy ep")
        if parallel.dp_size not in (None, 1):
            raise UsageError(
                f"tp has no data parallelism (--dp-size {parallel.dp_size}); "
                f"use --strategy mixed --dp-size {parallel.dp_size} --tp-size {tp}"
            )
        if tp < 2:
            raise UsageError("tp needs --tp-size 2 or more; for one process use --strategy single")
        if world_size not in (None, tp):
            raise UsageError(
                f"tp: --tp-size {tp} must equal the world size {world_size}; "
                f"drop --nproc, or use --strategy mixed --tp-size {tp} for dp × tp"
            )
        return ParallelDims(tp, dp=1, tp=tp)

    @classmethod
    def flags_for_world(cls, world_size: int, model: ModelConfig) -> list[str]:
        return ["--tp-size", str(world_size)]

    def params_per_rank(self, counts: ParamCounts) -> float:
        return tensor_parallel_params_per_rank(self.model_config, counts, self.dims.tp)

    @property
    def loss_scale(self) -> float:
        return 1.0  # one data shard: nothing averages the gradients

    def parallelize(self, model: nn.Module, materialize: Materialize, train: TrainConfig) -> nn.Module:
        apply_tensor_parallel(model, self.dims.mesh("tp"))
        apply_layer_wrappers(model, train)
        materialize(model)
        return model

    def after_backward(self, model: nn.Module) -> None:
        finish_partial_gradients(model)

    def shard(self, name: str, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        return local_shard(param, tensor_parallel_shard(name, full, self.dims.tp))

    def checkpoint_tensor(self, param_name: str, tensor: torch.Tensor) -> torch.Tensor | LocalBoxes:
        return gate_up_checkpoint_view(param_name, tensor, self.dims.tp)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        state = super().full_state_dict(model)
        return None if state is None else gate_up_to_hf_order(state, self.dims.tp)
