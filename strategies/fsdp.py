"""`fsdp`: FSDP2 (`fully_shard`) per decoder layer, then the root, over a 1-D `dp` mesh of every rank.

Why per layer: each layer's parameters are all-gathered just before its forward (and again before
its backward) and freed right after, so one rank never holds more than one layer unsharded; the
root group holds what is left (embeddings, final norm, lm_head).

Meta-device init: `fully_shard` turns every meta parameter into a meta DTensor sharded on dim 0
(torch.chunk rule, so shards may be uneven); `materialize` then allocates the local shards with
`to_empty` and fills each from the full tensor drawn for (seed, name), sliced by `distribute_tensor`
with the same placements. No rank ever allocates more than its shards. FSDP2 re-points its padded
shard storage at the filled tensors in its lazy init, before the first forward.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from moectl.config import TrainConfig
from moectl.metrics import ParamCounts
from moectl.model import apply_layer_wrappers, decoder_layers
from strategies.base import Materialize, Strategy


class FSDP(Strategy):
    name = "fsdp"
    summary = "FSDP2 (fully_shard) per decoder layer + root: parameters, grads and optimizer state sharded"

    def params_per_rank(self, counts: ParamCounts) -> float:
        # Every parameter is split on dim 0 over all ranks; the transient unsharded layer is not counted.
        return counts.total / self.world_size

    def parallelize(self, model: nn.Module, materialize: Materialize, train: TrainConfig) -> nn.Module:
        apply_layer_wrappers(model, train)  # AC -> compile, before FSDP (the fixed wrap order)
        if self.mesh is None:  # one process, no process group: one shard is the whole model
            materialize(model)
            return model
        # The parameters are already stored in the training dtype (bf16 on GPU, fp32 on CPU), as in
        # `single` and `ddp`: compute and gradient reduction stay in that dtype, so FSDP adds no cast
        # and no fp32 master copy that the other strategies lack. Naming the dtype keeps it explicit.
        dtype = next(model.parameters()).dtype
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)
        mesh = self.mesh["dp"]
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        if mesh.device_type == "cpu":
            # FSDP2 asks the backend for ReduceOp.AVG. gloo's AVG reduce-scatter averages in torch 2.11
            # and 2.13 but silently summed in others (pytorch#162338, still open): SUM plus FSDP's own
            # division is right on every version, and costs nothing that matters on the CPU.
            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.set_force_sum_reduction_for_comms(True)
        materialize(model)  # each rank fills only its own shards
        return model

    # FSDP2 averages gradients over the dp ranks (nccl's AVG, or SUM then a division), so the base
    # class's loss_scale = dp degree turns that average back into the sum the loss normalisation wants.
