"""`ddp`: DistributedDataParallel over every rank; gradients reduced on the last micro-batch only."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from moectl.config import TrainConfig
from moectl.model.build import apply_layer_wrappers
from moectl.model.precision import Precision
from moectl.model.sizing import count_params
from moectl.parallel.cost import Collective, Exposure, StepCost, ring
from moectl.strategy import Materialize, Strategy


class DDP(Strategy):
    name = "ddp"
    summary = "DistributedDataParallel: full replica per rank, gradients all-reduced"

    def step_cost(self, train: TrainConfig, ranks_per_node: int, precision: Precision) -> StepCost:
        total, world = count_params(self.model_config).total, self.dims.world_size
        if world == 1:
            return StepCost(params=total, grads=total)
        # The buckets are a second copy of the gradients (in the weights' dtype), all-reduced while
        # backward still runs.
        sent = total * precision.param_bytes * ring(world)
        spans = self.dims.spans_nodes("dp", ranks_per_node)
        all_reduce = Collective("gradient all-reduce", sent, world, spans, Exposure.BUCKETED)
        return StepCost(params=total, grads=total, buckets=total, collectives=(all_reduce,))

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
