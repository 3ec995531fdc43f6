"""Data-parallel building blocks: FSDP2 per decoder layer then the root, and a bucketed gradient
all-reduce for what no wrapper reduces.

Where parallel building blocks live: a piece that applies one kind of parallelism to the model,
whatever strategy composes it, sits in the core under `moectl/parallel/` (data_parallel,
tensor_parallel, expert_parallel and its token dispatch); a strategy file holds the choice and the
wrap order only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from moectl.config import TrainConfig
from moectl.model.build import decoder_layers
from moectl.run import runtime

#: gradients are flattened into buckets of about this size, one all-reduce each
BUCKET_BYTES = 256 * 2**20


def mixed_precision_policy(train: TrainConfig) -> MixedPrecisionPolicy:
    """FSDP2's policy for the run's `train.precision`: the parameters are sharded in their dtype (fp32
    under `mixed`, as under `fp32`; bf16 under `bf16`), gathered and computed with in the compute dtype,
    and their gradients reduce-scattered (and accumulated across micro-batches) in the parameters'
    dtype. Under `bf16` and `fp32` both dtypes are the parameters' own: FSDP adds no cast."""
    precision = runtime.precision(train)
    return MixedPrecisionPolicy(param_dtype=precision.compute_dtype, reduce_dtype=precision.param_dtype)


def fully_shard_layers(
    model: nn.Module,
    mesh: DeviceMesh,
    policy: MixedPrecisionPolicy | None = None,
    *,
    sum_gradients: bool = False,
    ignored_params: set[nn.Parameter] | None = None,
) -> None:
    """FSDP2 (`fully_shard`) on every decoder layer, then the root (embedding, final norm, lm_head).

    Why per layer: each layer's parameters are gathered just before its forward (and again before its
    backward) and freed right after, so a rank never holds more than one layer unsharded. Parameters
    that are already DTensors (tensor parallel) become 2-D DTensors.

    `policy`: FSDP2's mixed precision, `mixed_precision_policy(train)`; None computes and reduces in the
    parameters' own dtype. `sum_gradients`: reduce sums instead of averages (for strategies whose loss
    is already normalised to the global batch). On gloo every reduction is forced to SUM (with FSDP's
    own division when averaging): gloo's AVG reduce-scatter averaged in some torch versions and silently
    summed in others, and SUM is right on all. `ignored_params` stay plain tensors that FSDP neither
    shards nor reduces (say experts that live on one rank only).
    """
    if policy is None:
        dtype = next(model.parameters()).dtype
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, ignored_params=ignored_params)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored_params)
    configure_reductions(model, mesh, sum_gradients=sum_gradients)


def configure_reductions(model: nn.Module, mesh: DeviceMesh, *, sum_gradients: bool) -> None:
    """Sum or average (see `fully_shard_layers`) on every FSDP module of `model`."""
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        if sum_gradients:
            module.set_gradient_divide_factor(1.0)
        if sum_gradients or mesh.device_type == "cpu":
            module.set_force_sum_reduction_for_comms(True)


def all_reduce_gradients(params: list[nn.Parameter], group: dist.ProcessGroup | None) -> None:
    """Sum the gradients of `params` over `group` (None: the world), flattened into few large buckets.

    A missing gradient counts as zeros, so every rank flattens the same layout. DTensor gradients
    are reduced through their local shards (their placement over `group` is the caller's concern).
    """
    bucket: list[torch.Tensor] = []
    bucket_bytes = 0
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
        if bucket and (grad.dtype != bucket[0].dtype or bucket_bytes >= BUCKET_BYTES):
            _all_reduce_bucket(bucket, group)
            bucket, bucket_bytes = [], 0
        bucket.append(grad)
        bucket_bytes += grad.numel() * grad.element_size()
    if bucket:
        _all_reduce_bucket(bucket, group)


def _all_reduce_bucket(grads: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat, group=group)
    for grad, reduced in zip(grads, flat.split([grad.numel() for grad in grads]), strict=True):
        grad.copy_(reduced.view_as(grad))
