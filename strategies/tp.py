"""`tp`: DTensor tensor parallelism over attention heads and the experts' intermediate dimension.

Every tp rank reads the same sequences (data-parallel degree 1); the building blocks, and why the
parameters are DTensors, are in moectl/parallel/tensor_parallel.py.
"""

from __future__ import annotations

from torch import nn

from moectl.config import ModelConfig, ParallelConfig, TrainConfig
from moectl.errors import UsageError
from moectl.model.build import apply_layer_wrappers
from moectl.model.precision import Precision
from moectl.model.sizing import count_params
from moectl.parallel.cost import StepCost
from moectl.parallel.dims import ParallelDims
from moectl.parallel.tensor_parallel import (
    TensorParallelState,
    apply_tensor_parallel,
    finish_partial_gradients,
    tensor_parallel_all_reduces,
    tensor_parallel_params_per_rank,
)
from moectl.strategy import Layout, Materialize, Strategy


class TensorParallel(TensorParallelState, Strategy):
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
    def layouts(cls, world_size: int, model: ModelConfig) -> list[Layout]:
        return [Layout(world_size, tp_size=world_size)] if world_size > 1 else []

    def step_cost(self, train: TrainConfig, ranks_per_node: int, precision: Precision) -> StepCost:
        model, tp = self.model_config, self.dims.tp
        held = tensor_parallel_params_per_rank(model, count_params(model), tp)
        tokens, spans = train.micro_batch * train.seq_len, self.dims.spans_nodes("tp", ranks_per_node)
        # No FSDP: the backward all-reduces carry the residual stream's gradients in the weights' dtype.
        forward, backward = precision.compute_bytes, precision.param_bytes
        num_micro = self.micro_batches(train)
        all_reduces = tensor_parallel_all_reduces(model, tokens, num_micro, tp, spans, forward, backward)
        return StepCost(params=held, grads=held, collectives=(all_reduces,))

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
