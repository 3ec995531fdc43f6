"""`ddp`: DistributedDataParallel over every rank; gradients reduced on the last micro-batch only."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from moectl.config import TrainConfig
from moectl.model.build import apply_layer_wrappers
from moectl.strategy import Materialize, Strategy


class DDP(Strategy):
    name = "ddp"
    summary = "DistributedDataParallel: full replica per rank, gradients all-reduced"

    def parallelize(self, model: nn.Module, materialize: Materialize, train: TrainConfig) -> nn.Module:
        apply_layer_wrappers(model, train)
        materialize(model)  # DDP broadcasts real weights at construction
        if self.dims.world_size == 1:  # one process, no process group: nothing to reduce
            return model
        device_ids = [model.device] if model.device.type == "cuda" else None
        # Experts are 3-D parameters, so every parameter gets a gradient each step (zeros for idle experts).
        return DistributedDataParallel(
            model, device_ids=device_ids, process_group=self.dims.group("dp"), find_unused_parameters=False
        )

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, is_last_micro_batch: bool) -> Iterator[None]:
        if is_last_micro_batch or not isinstance(model, DistributedDataParallel):
            yield
        else:
            with model.no_sync():
                yield
