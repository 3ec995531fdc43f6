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
from moectl.model.sizing import ParamCounts, fsdp_gathered_params
from moectl.parallel.data_parallel import fully_shard_layers, mixed_precision_policy
from moectl.strategy import Materialize, Strategy


class FSDP(Strategy):
    name = "fsdp"
    summary = "FSDP2 (fully_shard) per decoder layer + root: parameters, grads and optimizer state sharded"

    def params_per_rank(self, counts: ParamCounts) -> float:
        # Every parameter is split on dim 0 over all ranks; the transient unsharded layer is not counted.
        return counts.total / self.dims.world_size

    def grad_params_per_rank(self, counts: ParamCounts, num_micro_batches: int) -> float:
        # Deferring the reduce-scatter to the last micro-batch keeps every layer's gradient unsharded.
        return counts.total if num_micro_batches > 1 else self.params_per_rank(counts)

    def compute_copy_params(self, counts: ParamCounts) -> float:
        if self.dims.world_size == 1:  # no FSDP on one process: autocast's casts of every weight
            return counts.total
        return fsdp_gathered_params(counts, self.model_config.num_layers)

    def parallelize(self, model: nn.Module, materialize: Materialize, train: TrainConfig) -> nn.Module:
        apply_layer_wrappers(model, train)  # AC -> compile, before FSDP (the fixed wrap order)
        if self.dims.world_size > 1:  # one process, no process group: one shard is the whole model
            fully_shard_layers(model, self.dims.mesh("dp"), mixed_precision_policy(train))
        materialize(model)  # each rank fills only its own shards
        return model
