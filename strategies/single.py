"""`single`: the model as it is, on one device. The reference every other strategy is checked against."""

from __future__ import annotations

from torch import nn

from moectl.config import ModelConfig, TrainConfig
from moectl.errors import UsageError
from moectl.model import apply_layer_wrappers
from strategies.base import Materialize, Strategy


class Single(Strategy):
    name = "single"
    summary = "one process, one device: the numerical reference"

    def validate(self, model: ModelConfig, train: TrainConfig) -> None:
        if self.world_size != 1:
            raise UsageError(
                f"single runs on one process, not {self.world_size}; drop --nproc or pick ddp/fsdp/tp/ep"
            )
        super().validate(model, train)

    @property
    def loss_scale(self) -> float:
        return 1.0

    def parallelize(self, model: nn.Module, materialize: Materialize, train: TrainConfig) -> nn.Module:
        apply_layer_wrappers(model, train)
        materialize(model)
        return model
