"""The strategy contract. The training loop talks to a strategy only through these methods.

A strategy (1) validates its degrees against the world size and the model, (2) builds its device
mesh and parallelises the meta-device model in place, calling `materialize` when its wrappers need
real storage, (3) gives the loop a no-sync context for micro-batches whose gradients must not be
reduced yet and a hook after backward for reductions it does by hand, and (4) returns the full,
unsharded state dict with HF keys on rank 0.

Wrap order, stated once for every strategy: TP / EP -> activation checkpointing -> compile -> FSDP/DDP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moectl.config import ModelConfig, ParallelConfig, TrainConfig
from moectl.errors import UsageError
from moectl.metrics import ParamCounts
from moectl.model import canonical_name, local_shard

Materialize = Callable[[nn.Module], None]


class Strategy:
    """Defaults describe plain data parallelism over every rank; subclasses override what differs."""

    name = "base"
    #: one line for `--help` and the README
    summary = ""

    def __init__(self, parallel: ParallelConfig, world_size: int):
        self.parallel = parallel
        self.world_size = world_size
        self.mesh: DeviceMesh | None = None

    # ---- degrees -------------------------------------------------------------------------------
    @classmethod
    def default_world_size(cls, parallel: ParallelConfig) -> int:
        """World size when --nproc is not given: follows from the degrees."""
        return parallel.dp_size or 1

    @property
    def dp_size(self) -> int:
        """Number of distinct data shards per step (ranks that read different sequences)."""
        return self.world_size

    def dp_rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def validate(self, model: ModelConfig, train: TrainConfig) -> None:
        """Raise UsageError naming the numbers and the fix when the degrees do not fit."""
        if self.parallel.dp_size is not None and self.parallel.dp_size != self.world_size:
            raise UsageError(
                f"{self.name}: --dp-size {self.parallel.dp_size} must equal the world size {self.world_size}; "
                f"drop --dp-size or set --nproc {self.parallel.dp_size}"
            )
        if self.parallel.tp_size != 1 or self.parallel.ep_size != 1:
            raise UsageError(
                f"{self.name} has no tensor or expert parallelism; drop --tp-size/--ep-size or pick "
                "--strategy tp, mixed or ep"
            )

    def params_per_rank(self, counts: ParamCounts) -> float:
        """Parameters held by one rank, for the dry-run memory estimate."""
        return counts.total

    # ---- building ------------------------------------------------------------------------------
    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        if self.world_size == 1:
            return None
        return init_device_mesh(device_type, (self.world_size,), mesh_dim_names=("dp",))

    def parallelize(self, model: nn.Module, materialize: Materialize, train: TrainConfig) -> nn.Module:
        raise NotImplementedError

    def shard(self, name: str, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a full tensor, used when materialising; DTensors slice themselves."""
        return local_shard(param, full)

    # ---- the loop's hooks ----------------------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        """Factor on the loss so that gradients come out as the sum over data shards.

        The loss is already normalised by the global token count; wrappers that *average* gradients
        over dp ranks (DDP, FSDP) would divide once more, so the loss is multiplied back.
        """
        return float(self.dp_size)

    def loss_group(self) -> dist.ProcessGroup | None:
        """Group over which per-rank loss sums add up to the global loss (the dp ranks)."""
        if self.mesh is None:
            return None
        return self.mesh.get_group("dp")

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, is_last_micro_batch: bool) -> Iterator[None]:
        """Defer gradient reduction on all but the last micro-batch. Default: an FSDP2-wrapped model
        keeps unsharded gradients locally until then; anything else has nothing to defer."""
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(is_last_micro_batch)
        yield

    def after_backward(self, model: nn.Module) -> None:
        """Gradient reductions the wrappers do not do (default: none)."""

    def checkpoint_tensor(self, param_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """How one model or optimizer-state tensor of parameter `param_name` (canonical HF name) goes
        into a resumable checkpoint (torch.distributed.checkpoint).

        DCP reshards DTensors by their global layout and treats plain tensors as the same full copy
        on every rank. A strategy that keeps a *plain* local shard (say experts [E/ep, ...] as an
        ordinary tensor) must return a DTensor view of it here (`DTensor.from_local(tensor, mesh,
        [Shard(0)], run_check=False)`), or checkpoints would hold one rank's experts only. A local
        shard that is several pieces of the HF tensor (rows kept in a permuted order) returns
        `moectl.checkpoint.LocalBoxes` of them (see `permuted_blocks_view`). Default: unchanged,
        right for replicated tensors and for DTensor parameters (FSDP2, TP) in HF order.
        """
        return tensor

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model with HF keys, gathered to rank 0 on the CPU; None on other ranks."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.world_size == 1:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        else:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(model, options=options)
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        return {canonical_name(k): v for k, v in state.items()}


class SameDataOnEveryRank:
    """Mixin for strategies whose ranks all read the same sequences (no data parallelism): tp, and
    the naive expert-parallel baseline. Put it before Strategy in the bases."""

    @property
    def dp_size(self) -> int:
        return 1

    def dp_rank(self) -> int:
        return 0
