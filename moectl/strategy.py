"""The strategy contract. The training loop talks to a strategy only through these members.

A strategy (1) states the degrees it uses (`parallel_dims`, checked by `ParallelDims.check` plus any
rule of its own), (2) parallelises the meta-device model in place on the named meshes of its
`ParallelDims`, calling `materialize` when its wrappers need real storage, (3) gives the loop a
no-sync context for micro-batches whose gradients must not be reduced yet and a hook after backward
for reductions it does by hand, and (4) returns the full, unsharded state dict with HF keys on rank 0.

Wrap order, stated once for every strategy: TP / EP -> FP8 linears (`train.fp8`) -> activation
checkpointing -> compile -> FSDP/DDP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from moectl.config import ModelConfig, ParallelConfig, TrainConfig
from moectl.errors import UsageError
from moectl.model.build import canonical_name, local_shard
from moectl.model.sizing import ParamCounts
from moectl.parallel.dims import ParallelDims
from moectl.parallel.gradients import grad_sum_of_squares

Materialize = Callable[[nn.Module], None]


class Strategy:
    """Defaults describe plain data parallelism over every rank; subclasses override what differs."""

    name: ClassVar[str] = "base"
    #: one line for `--help`, `moectl bench` and the README
    summary: ClassVar[str] = ""

    def __init__(self, dims: ParallelDims, model: ModelConfig, parallel: ParallelConfig):
        self.dims = dims
        self.model_config = model
        self.parallel = parallel

    # ---- degrees -------------------------------------------------------------------------------
    @classmethod
    def parallel_dims(cls, parallel: ParallelConfig, world_size: int | None) -> ParallelDims:
        """The degrees this strategy runs with, from the flags and the world size (None: the world the
        flags imply, for a run without --nproc). Raise UsageError for a rule of the strategy's own;
        the shared rules are `ParallelDims.check`'s. Default: data parallel over every rank."""
        world = world_size or parallel.dp_size or 1
        if parallel.dp_size is not None and parallel.dp_size != world:
            raise UsageError(
                f"{cls.name}: --dp-size {parallel.dp_size} must equal the world size {world}; "
                f"drop --dp-size or set --nproc {parallel.dp_size}"
            )
        if parallel.tp_size != 1 or parallel.ep_size != 1:
            raise UsageError(
                f"{cls.name} has no tensor or expert parallelism; drop --tp-size/--ep-size or pick "
                "--strategy tp, mixed or ep"
            )
        return ParallelDims(world, dp=world)

    @classmethod
    def flags_for_world(cls, world_size: int, model: ModelConfig) -> list[str]:
        """`moectl train` flags that run this strategy on `world_size` processes (for `moectl bench`)."""
        return []

    def params_per_rank(self, counts: ParamCounts) -> float:
        """Parameters held by one rank, for the memory estimate."""
        return counts.total

    def grad_params_per_rank(self, counts: ParamCounts, num_micro_batches: int) -> float:
        """Gradient elements one rank holds at its peak [as many as its parameters]."""
        return self.params_per_rank(counts)

    def compute_copy_params(self, counts: ParamCounts) -> float:
        """Weights of which a rank holds a bf16 copy at its peak under `train.precision=mixed`, for the
        memory estimate. Default: every weight it holds (autocast's casts, alive from the forward that
        makes them to the backward that reads them); a strategy whose layers FSDP2 gathers counts the
        gathered units (`moectl.model.sizing.fsdp_gathered_params`)."""
        return self.params_per_rank(counts)

    # ---- building ------------------------------------------------------------------------------
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
        return float(self.dims.dp)

    def loss_group(self) -> dist.ProcessGroup | None:
        """Group over which per-rank loss sums add up to the global loss (the dp ranks)."""
        return self.dims.group("dp")

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, is_last_micro_batch: bool) -> Iterator[None]:
        """Defer gradient reduction on all but the last micro-batch. Default: an FSDP2-wrapped model
        keeps unsharded gradients locally until then; anything else has nothing to defer."""
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(is_last_micro_batch)
        yield

    def after_backward(self, model: nn.Module) -> None:
        """Gradient reductions the wrappers do not do (default: none)."""

    def grad_norm(self, model: nn.Module) -> torch.Tensor:
        """The global L2 norm of all the model's gradients after `after_backward`, as an fp32 scalar
        equal on every rank (for logging and `train.max_grad_norm`): every element of the whole model
        counted once. Default: plain gradients are replicated, DTensor gradients state their sharding
        (`moectl.parallel.gradients`); a strategy with plain local shards adds those over its group."""
        return grad_sum_of_squares(model.parameters()).sqrt()

    def step_metrics(self) -> dict[str, float]:
        """Figures of this rank's last optimizer step for metrics.jsonl (and, as medians after warm-up,
        summary.json), counted on the host; called once per step. Default: none."""
        return {}

    def checkpoint_tensor(self, param_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """How one model or optimizer-state tensor of parameter `param_name` (canonical HF name) goes
        into a resumable checkpoint (torch.distributed.checkpoint).

        DCP reshards DTensors by their global layout and treats plain tensors as the same full copy
        on every rank. A strategy that keeps a *plain* local shard (say experts [E/ep, ...] as an
        ordinary tensor) must return a DTensor view of it here (`DTensor.from_local(tensor, mesh,
        [Shard(0)], run_check=False)`), or checkpoints would hold one rank's experts only. A local
        shard that is several pieces of the HF tensor (rows kept in a permuted order) returns
        `moectl.io.dcp_layouts.LocalBoxes` of them (see `permuted_blocks_view`). Default: unchanged,
        right for replicated tensors and for DTensor parameters (FSDP2, TP) in HF order.
        """
        return tensor

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model with HF keys, gathered to rank 0 on the CPU; None on other ranks."""
        if self.dims.world_size == 1:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        else:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(model, options=options)
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        return {canonical_name(k): v for k, v in state.items()}
