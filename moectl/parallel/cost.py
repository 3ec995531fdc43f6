"""What a strategy holds and sends per optimizer step (`Strategy.step_cost`): the counts behind the
`--dry-run`'s memory estimate and `moectl plan`'s prediction. The strategy counts elements and bytes;
the planner (moectl/plan/predict.py) turns them into GiB and seconds with its hardware figures.

Bytes follow the run's precision (`moectl.model.precision.Precision`): what reduces gradients over ranks
(DDP's and the hand-made all-reduces, FSDP's reduce-scatter) sends them in the weights' dtype (fp32 under
`train.precision=mixed`); what carries compute (FSDP's gathers of bf16 weights, ep's token rows, tensor
parallelism's forward all-reduces) sends the compute dtype's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moectl.model.precision import Precision


class Exposure(Enum):
    """How much of a collective's transfer time the step waits for: the planner applies the calibrated
    figure of each class (moectl/plan/calibration.py)."""

    BUCKETED = "bucketed"  # gradient all-reduce in buckets during backward (DDP): `1 - ddp_overlap`
    SHARDED = "sharded"  # FSDP's gathers and reduce-scatters: `fsdp_exposure` × the transfer
    ACTIVATIONS = "activations"  # all-reduces on the forward and backward path (TP): `1 - tp_overlap`
    WAITED = "waited"  # waited for in full (gradients reduced by hand after backward)
    ALL_TO_ALL = "all-to-all"  # token exchanges, at the calibrated all-to-all bandwidth, in full


@dataclass(frozen=True)
class Collective:
    """One kind of communication of one optimizer step on one rank."""

    name: str  # as `moectl plan` reports it: "gradient all-reduce", "fsdp gather/scatter", ...
    bytes_sent: float  # bytes this rank sends per optimizer step
    group: int  # ranks in the group
    spans_nodes: bool  # whether the group reaches beyond one node (the network instead of NVLink)
    exposure: Exposure


@dataclass(frozen=True)
class StepCost:
    """A rank's parameters, gradients, buffers and communication per optimizer step."""

    params: float  # parameters this rank holds (its shards)
    grads: float  # gradient elements alive at the peak while micro-batches accumulate (whole until the last)
    fsdp_unit: float = (
        0.0  # parameters of one FSDP unit (a decoder layer's share), gathered whole; 0: no FSDP
    )
    fsdp_root: float = 0.0  # parameters of FSDP's root (embeddings, lm_head), gathered whole for the step
    buckets: float = 0.0  # gradient elements of a second copy (DDP's buckets)
    buffer_bytes: float = 0.0  # exchange buffers at their fullest
    recorded_bytes: float = 0.0  # what activation checkpointing records beyond the layer inputs it keeps
    dispatch_pairs: float = 0.0  # (token, chosen expert) pairs per step whose rows cross ranks in a dispatch
    collectives: tuple[Collective, ...] = ()


def ring(group: int) -> float:
    """Bytes each rank sends per byte of a ring all-reduce."""
    return 2 * (group - 1) / group


def fsdp_bytes(params: float, group: int, num_micro_batches: int, precision: Precision) -> float:
    """Bytes FSDP sends per step for `params` sharded over `group` ranks: a gather in forward and one in
    backward per micro-batch, in the compute dtype (FSDP2's `param_dtype`), and one reduce-scatter per
    step, in the weights' dtype (its `reduce_dtype`)."""
    per_param = 2 * num_micro_batches * precision.compute_bytes + precision.param_bytes
    return per_param * params * (group - 1) / group
