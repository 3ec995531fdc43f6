"""`single`: the model as it is, on one device. The reference every other strategy is checked against."""

from __future__ import annotations

from torch import nn

from moectl.config import ModelConfig, ParallelConfig, TrainConfig
from moectl.errors import UsageError
from moectl.model.build import apply_layer_wrappers
from moectl.model.precision import Precision
from moectl.model.sizing import count_params
from moectl.parallel.cost import StepCost
from moectl.parallel.dims import ParallelDims
from moectl.strategy import Layout, Materialize, Strategy


class Single(Strategy):
    name = "single"
    summary = "one process, one device: the numerical reference"
    one_process = True

    @classmethod
    def parallel_dims(cls, parallel: ParallelConfig, world_size: int | None) -> ParallelDims:
        if (world_size or 1) != 1:
            raise UsageError(
                f"single runs on one process, not {world_size}; drop --nproc or pick ddp/fsdp/tp/ep"
            )
        return super().parallel_dims(parallel, 1)

    @classmethod
    def layouts(cls, world_size: int, model: ModelConfig) -> list[Layout]:
        return [Layout(1)] if world_size == 1 else []

    def step_cost(self, train: TrainConfig, ranks_per_node: int, precision: Precision) -> StepCost:
        total = count_params(self.model_config).total
        return StepCost(params=total, grads=total)

    @property
    def loss_scale(self) -> float:
        return 1.0

    def parallelize(self, model: nn.Module, materialize: Materialize, train: TrainConfig) -> nn.Module:
        apply_layer_wrappers(model, train)
        materialize(model)
        return model
