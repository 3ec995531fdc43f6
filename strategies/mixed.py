"""`mixed`: a 2-D mesh (dp, tp): tensor parallel inside each tp group, data parallel across groups.

TP is tp.py's, unchanged. Across `dp` runs either FSDP2 (`parallel.mixed_dp: fsdp`, the default:
parameters, gradients and optimizer state sharded over dp, on top of the tp sharding) or plain
replication with a gradient all-reduce over dp (`mixed_dp: ddp`).

Why `ddp` is a hand-written bucketed all-reduce and not `DistributedDataParallel`: DDP does not take
DTensor parameters (its TP bridge is a private torch function); gradients that are summed once per
step after the last micro-batch are all that is needed, and gloo (the CPU backend) has no AVG op, so
the gradients are summed and the loss is not scaled by dp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from moectl.config import ModelConfig, ParallelConfig, TrainConfig
from moectl.errors import UsageError
from moectl.metrics import ParamCounts
from moectl.model import apply_layer_wrappers, decoder_layers
from strategies.base import Materialize
from strategies.tp import (
    TensorParallel,
    apply_tensor_parallel,
    check_tp_divides_model,
    tensor_parallel_params_per_rank,
)

DP_WRAPPERS = ("fsdp", "ddp")
#: gradient bucket for the hand-made dp all-reduce: fewer, larger collectives
BUCKET_BYTES = 64 * 2**20


def shard_with_fsdp(model: nn.Module, dp_mesh) -> None:
    """FSDP2 per decoder layer, then the root (embedding, final norm, lm_head).

    Parameters that are already tp DTensors become 2-D (dp, tp) DTensors.
    """
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)


def all_reduce_gradients(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Sum every gradient over `group`, packed into flat buckets per dtype."""
    bucket: list[torch.Tensor] = []
    size = 0

    def flush() -> None:
        nonlocal size
        if not bucket:
            return
        flat = torch.cat([grad.reshape(-1) for grad in bucket])
        dist.all_reduce(flat, group=group)
        offset = 0
        for grad in bucket:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        bucket.clear()
        size = 0

    for param in model.parameters():
        if param.grad is None:
            continue
        grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
        if bucket and (
            grad.dtype != bucket[0].dtype or size + grad.numel() * grad.element_size() > BUCKET_BYTES
        ):
            flush()
        bucket.append(grad)
        size += grad.numel() * grad.element_size()
    flush()


class Mixed(TensorParallel):
    """dp × tp on a (dp, tp) mesh; tp groups are consecutive ranks (one host's fast links)."""

    name = "mixed"
    summary = "2-D dp × tp: tensor parallel inside groups, FSDP2 (or replicated dp) across them"

    @classmethod
    def default_world_size(cls, parallel: ParallelConfig) -> int:
        return (parallel.dp_size or 1) * parallel.tp_size

    @property
    def dp_size(self) -> int:
        return self.parallel.dp_size or max(1, self.world_size // self.tp_size)

    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp") if self.mesh is not None else 0

    @property
    def loss_scale(self) -> float:
        # FSDP2 averages gradients over dp; the hand-made ddp path sums them.
        return float(self.dp_size) if self.parallel.mixed_dp == "fsdp" else 1.0

    def validate(self, model: ModelConfig, train: TrainConfig) -> None:
        self.model_config = model
        parallel = self.parallel
        if parallel.ep_size != 1:
            raise UsageError("mixed has no expert parallelism; drop --ep-size or pick --strategy ep")
        if parallel.mixed_dp not in DP_WRAPPERS:
            raise UsageError(
                f"parallel.mixed_dp must be one of {', '.join(DP_WRAPPERS)}, got {parallel.mixed_dp!r}"
            )
        if self.world_size < 2:
            raise UsageError(
                "mixed needs 2 or more processes (--dp-size × --tp-size); for one process use --strategy single"
            )
        if self.world_size % self.tp_size:
            raise UsageError(
                f"mixed: the world size {self.world_size} is not a multiple of --tp-size {self.tp_size}; "
                f"set --nproc to a multiple of {self.tp_size} or give --dp-size"
            )
        if self.dp_size * self.tp_size != self.world_size:
            raise UsageError(
                f"mixed: --dp-size {self.dp_size} × --tp-size {self.tp_size} = {self.dp_size * self.tp_size} "
                f"must equal the world size {self.world_size}; set --nproc {self.dp_size * self.tp_size} "
                "or drop --dp-size"
            )
        check_tp_divides_model(self.name, model, self.tp_size)

    def params_per_rank(self, counts: ParamCounts) -> float:
        per_tp_rank = tensor_parallel_params_per_rank(self.model_config, counts, self.tp_size)
        return per_tp_rank / self.dp_size if self.parallel.mixed_dp == "fsdp" else per_tp_rank

    def parallelize(self, model: nn.Module, materialize: Materialize, train: TrainConfig) -> nn.Module:
        apply_tensor_parallel(model, self.mesh["tp"])
        apply_layer_wrappers(model, train)
        if self.parallel.mixed_dp == "fsdp":
            shard_with_fsdp(model, self.mesh["dp"])
        # Every rank fills its shard from the same deterministic source, so dp replicas start equal.
        materialize(model)
        return model

    def after_backward(self, model: nn.Module) -> None:
        super().after_backward(model)  # tp: Partial q_norm/k_norm gradients (a no-op under FSDP2)
        if self.parallel.mixed_dp == "ddp" and self.dp_size > 1:
            all_reduce_gradients(model, self.mesh.get_group("dp"))
