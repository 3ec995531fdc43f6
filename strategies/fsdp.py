"""`fsdp`: FSDP2 (`fully_shard`) per decoder layer, then the root, over a 1-D `dp` mesh of every rank.

Meta-device init: `fully_shard` turns every meta parameter into a meta DTensor sharded on dim 0
(torch.chunk rule, so shards may be uneven); `materialize` then allocates the local shards with
`to_empty` and fills each from the full tensor drawn for (seed, name), sliced by `distribute_tensor`
with the same placements. No rank ever allocates more than its shards. FSDP2 re-points its padded
shard storage at the filled tensors in its lazy init, before the first forward.

FSDP2 averages gradients over the dp ranks; the contract's default loss_scale (the dp degree) turns
that average back into the sum the loss normalisation wants.
"""

from __future__ import annotations

from torch import nn

from moectl.config import TrainConfig
from moectl.model.build import apply_layer_wrappers
from moectl.model.precision import Precision
from moectl.model.sizing import count_params
from moectl.parallel.cost import Collective, Exposure, StepCost, fsdp_bytes
from moectl.parallel.data_parallel import fully_shard_layers, mixed_precision_policy
from moectl.strategy import Materialize, Strategy


class FSDP(Strategy):
    name = "fsdp"
    summary = "FSDP2 (fully_shard) per decoder layer + root: parameters, grads and optimizer state sharded"

    def step_cost(self, train: TrainConfig, ranks_per_node: int, precision: Precision) -> StepCost:
        counts, world = count_params(self.model_config), self.dims.world_size
        collectives = ()
        if world > 1:
            sent = fsdp_bytes(counts.total, world, self.micro_batches(train), precision)
            spans = self.dims.spans_nodes("dp", ranks_per_node)
            collectives = (Collective("fsdp gather/scatter", sent, world, spans, Exposure.SHARDED),)
        return StepCost(
            # Every parameter is split on dim 0 over all ranks; deferring the reduce-scatter to the last
            # micro-batch keeps every layer's gradient unsharded while micro-batches accumulate.
            params=counts.total / world,
            grads=counts.total,
            fsdp_unit=(counts.total - counts.embedding) / self.model_config.num_layers,
            fsdp_root=counts.embedding / self.dims.tp,
            collectives=collectives,
        )

    def parallelize(self, model: nn.Module, materialize: Materialize, train: TrainConfig) -> nn.Module:
        apply_layer_wrappers(model, train)  # AC -> compile, before FSDP (the fixed wrap order)
        if self.dims.world_size > 1:  # one process, no process group: one shard is the whole model
            fully_shard_layers(model, self.dims.mesh("dp"), mixed_precision_policy(train))
        materialize(model)  # each rank fills only its own shards
        return model
