"""The whole model, gathered one tensor at a time to rank 0 (the end-of-run model/ and any strategy's
`full_state_dict`): no process ever holds more than one gathered tensor."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moectl.model.build import canonical_name

#: how a strategy completes a plain local shard: (HF name, this rank's tensor) -> the full tensor on rank 0
GatherLocal = Callable[[str, torch.Tensor], torch.Tensor]


def full_tensors(
    model: nn.Module, gather_local: GatherLocal | None = None
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(HF name, full tensor on the CPU) on rank 0 and (HF name, None) elsewhere, for every entry of the
    model's state dict in order. DTensors (FSDP2, TP) are gathered with `full_tensor()` on every rank;
    `gather_local` completes plain local shards (ep's experts). Every rank must iterate to the end."""
    is_rank0 = not dist.is_initialized() or dist.get_rank() == 0
    for key, tensor in model.state_dict().items():
        name = canonical_name(key)
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()
        if gather_local is not None:
            full = gather_local(name, full)
        yield name, full.cpu() if is_rank0 else None
