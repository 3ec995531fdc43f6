"""The strategy contract. The training loop talks to a strategy only through these members.

A strategy (1) states the degrees it uses (`parallel_dims`, checked by `ParallelDims.check` plus any
rule of its own) and the layouts worth running on a world (`layouts`), (2) parallelises the meta-device
model in place on the named meshes of its `ParallelDims`, calling `materialize` when its wrappers need
real storage, (3) gives the loop a no-sync context for micro-batches whose gradients must not be
reduced yet and a hook after backward for reductions it does by hand, (4) streams the full, unsharded
state dict with HF keys to rank 0, tensor by tensor, (5) states what it holds and sends per step (`step_cost`), and owns
its options (`Options`, set as `parallel.<key>`).

Wrap order, stated once for every strategy: TP / EP -> FP8 linears (`train.fp8`) -> activation
checkpointing -> compile -> FSDP/DDP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from moectl.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig, checkpointing_mode, coerce
from moectl.errors import UsageError
from moectl.model.build import local_shard
from moectl.model.precision import Precision
from moectl.model.sizing import count_params
from moectl.parallel.cost import StepCost
from moectl.parallel.dims import ParallelDims
from moectl.parallel.full_state import full_tensors
from moectl.parallel.gradients import grad_sum_of_squares

Materialize = Callable[[nn.Module], None]


def option(default: Any, doc: str, key: str | None = None) -> Any:
    """A field of a strategy's `Options`: its default, one line for the docs, and the key that sets it
    (`parallel.<key>`; default: the field's name)."""
    return field(default=default, metadata={"doc": doc, "key": key})


@dataclass(frozen=True)
class StrategyOptions:
    """A strategy's own `parallel.*` keys (none here). A strategy declares its own as a nested frozen
    dataclass `Options(StrategyOptions)` of `option(...)` fields and checks their values in `check`."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise UsageError for a value the strategy cannot run with, naming the key and the fix."""

    @classmethod
    def keys(cls) -> dict[str, str]:
        """{`parallel.<key>` key: field name}."""
        return {f.metadata.get("key") or f.name: f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_config(cls, values: dict[str, Any]) -> StrategyOptions:
        """The options from `parallel` keys as given (YAML or `--set` values), typed and checked; every
        key must be one of `keys()`."""
        hints, names = typing.get_type_hints(cls), cls.keys()
        return cls(**{names[k]: coerce(v, hints[names[k]], f"parallel.{k}") for k, v in values.items()})

    def by_key(self) -> dict[str, Any]:
        return {key: getattr(self, name) for key, name in self.keys().items()}

    def changed(self) -> dict[str, Any]:
        """The keys whose values differ from their defaults."""
        defaults = type(self)().by_key()
        return {key: value for key, value in self.by_key().items() if value != defaults[key]}

    def label(self, name: str) -> str:
        """How `moectl plan` names the strategy `name` with these options (e.g. `ep+fsdp`)."""
        return name


def _yaml_scalar(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Layout:
    """One way to run a strategy on `world_size` processes: its degree flags and option values, what
    `moectl bench` runs and `moectl plan` predicts. `registry.build_strategy` checks it, as it checks
    every run: the degrees come out of the strategy's `parallel_dims` and `ParallelDims.check`."""

    world_size: int
    dp_size: int | None = None
    tp_size: int = 1
    ep_size: int = 1
    options: StrategyOptions = field(default_factory=StrategyOptions)

    def args(self) -> list[str]:
        """The `moectl train` flags of its degrees and of the options that differ from their defaults
        (`--nproc` apart: the caller knows the processes per node)."""
        args = [] if self.dp_size is None else ["--dp-size", str(self.dp_size)]
        args += ["--tp-size", str(self.tp_size)] if self.tp_size != 1 else []
        args += ["--ep-size", str(self.ep_size)] if self.ep_size != 1 else []
        for key, value in self.options.changed().items():
            args += ["--set", f"parallel.{key}={_yaml_scalar(value)}"]
        return args

    def apply(self, cfg: RunConfig) -> RunConfig:
        """`cfg` running this layout: its degrees, and its options over the ones `cfg` sets."""
        parallel = dataclasses.replace(
            cfg.parallel,
            dp_size=self.dp_size,
            tp_size=self.tp_size,
            ep_size=self.ep_size,
            options={**cfg.parallel.options, **self.options.changed()},
        )
        return dataclasses.replace(cfg, parallel=parallel)


class Strategy:
    """Defaults describe plain data parallelism over every rank; subclasses override what differs."""

    name: ClassVar[str] = "base"
    #: one line for `--help`, `moectl bench` and the README
    summary: ClassVar[str] = ""
    #: its own `parallel.*` keys; `self.options` holds their values
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    #: runs on one process only (`moectl bench` runs it on one, whatever --nproc says)
    one_process: ClassVar[bool] = False
    #: runs the experts as the dispatch's grouped GEMM (moectl.parallel.ep_dispatch): train.fp8_experts applies
    grouped_experts: ClassVar[bool] = False

    def __init__(self, dims: ParallelDims, model: ModelConfig, options: StrategyOptions | None = None):
        self.dims = dims
        self.model_config = model
        self.options = options if options is not None else self.Options()

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
    def layouts(cls, world_size: int, model: ModelConfig) -> list[Layout]:
        """The layouts worth running on `world_size` processes, preferred first: `moectl bench` runs
        the first (with none, it runs the strategy without degree flags), `moectl plan` predicts each.
        Each is checked as a run is, so one that the model forbids may be among them (plan lists it with
        its rule). Default: data parallel over every rank, from two on (on one it is `single`)."""
        return [Layout(world_size)] if world_size > 1 else []

    def redundant(self) -> str | None:
        """Why `moectl plan` does not offer this layout although it runs (another strategy runs the same
        thing), or None. Default: None."""
        return None

    def micro_batches(self, train: TrainConfig) -> int:
        """Micro-batches each rank runs per optimizer step."""
        return train.global_batch // (train.micro_batch * self.dims.dp)

    def step_cost(self, train: TrainConfig, ranks_per_node: int, precision: Precision) -> StepCost | None:
        """What one rank holds and sends per optimizer step of `train` (moectl.parallel.cost) in
        `precision` (its bytes per weight and per computed value) with `ranks_per_node` ranks per node:
        the --dry-run's memory estimate and `moectl plan`'s prediction rest on it. None: no cost model
        (plan lists the strategy as such). Default: None."""
        return None

    def layer_inputs_in_compute_dtype(self, cost: StepCost) -> bool:
        """Whether, under `train.precision=mixed`, every decoder layer's input (the residual stream) is in
        the compute dtype: FSDP2 casts the inputs of the layers it wraps (its policy's
        `cast_forward_inputs`). Elsewhere autocast leaves the residual stream in fp32, which the memory
        estimate counts and which makes tensor parallelism's backward all-reduces fp32. Default: FSDP2
        wraps the layers (the cost states an FSDP unit) over more than one data-parallel rank."""
        return bool(cost.fsdp_unit) and self.dims.dp > 1

    def compute_copy_params(self, cost: StepCost, train: TrainConfig) -> float:
        """Weights of which a rank holds a compute-dtype (bf16) copy at its peak under
        `train.precision=mixed`, for the memory estimate, from its `step_cost` of `train`: FSDP2's gathered
        units (the root, and two layers: the one computing and the one prefetched) where FSDP2 wraps the
        layers, else autocast's casts of the weights it holds (`autocast_copy_params`)."""
        if self.layer_inputs_in_compute_dtype(cost):
            return cost.fsdp_root + 2 * cost.fsdp_unit
        counts = count_params(self.model_config)
        return autocast_copy_params(cost.params, counts.embedding, self.model_config.num_layers, train)

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

    def full_state_dict(self, model: nn.Module) -> Iterable[tuple[str, torch.Tensor | None]]:
        """The whole model with HF keys, tensor by tensor: (name, full tensor on the CPU) on rank 0,
        (name, None) elsewhere. Every rank iterates to the end (the gathers are collective); no process
        ever holds more than one gathered tensor. [DTensors gathered one at a time]

        A plugin may still return the older form, a dict on rank 0 and None elsewhere
        (`full_state_items` reads both)."""
        return full_tensors(model)


def autocast_copy_params(held: float, outside_layers: float, num_layers: int, train: TrainConfig) -> float:
    """Weights of which autocast holds bf16 casts at a rank's peak, of `held` weights, `outside_layers` of
    them outside the decoder layers (embedding, lm_head): every one, alive from the forward that makes it to
    the backward that reads it; under full activation checkpointing a layer's forward keeps nothing (its
    recompute casts again in backward), so only those outside the layers and one layer's share."""
    if checkpointing_mode(train.activation_checkpointing) != "full":
        return held
    return outside_layers + (held - outside_layers) / num_layers


def full_state_items(
    state: Iterable[tuple[str, torch.Tensor | None]] | Mapping[str, torch.Tensor] | None,
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """`Strategy.full_state_dict`'s answer as (name, tensor) pairs, whichever form it came in."""
    if state is None:
        return iter(())
    if isinstance(state, Mapping):
        return iter(state.items())
    return iter(state)
