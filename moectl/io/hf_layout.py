"""Canonical key layout of Qwen3-MoE expert weights, on disk and in memory.

transformers 5 keeps the routed experts of one layer as two fused 3-D parameters::

    model.layers.L.mlp.experts.gate_up_proj   [E, 2*I, H]   (gate rows first, then up rows)
    model.layers.L.mlp.experts.down_proj      [E, H, I]

but ``save_pretrained`` writes them to safetensors one expert at a time::

    model.layers.L.mlp.experts.N.gate_proj.weight   [I, H]   == gate_up_proj[N, :I]
    model.layers.L.mlp.experts.N.up_proj.weight     [I, H]   == gate_up_proj[N, I:]
    model.layers.L.mlp.experts.N.down_proj.weight   [H, I]   == down_proj[N]

The router ``mlp.gate.weight [E, H]`` and every non-expert tensor have the same key in both forms.

The *canonical* layout used to compare checkpoints is the per-expert one: it is what HF writes, and
each per-expert matrix is a contiguous slice of the fused tensor, so a fused checkpoint can be read as
per-expert units with views only, never a copy of a whole fused tensor. This module is pure key and
tensor bookkeeping with no I/O, so model loading can reuse it (``fuse_expert_tensors``) as well as
checkpoint comparison (``moectl.io.safetensors_reader`` reads through ``canonical_units``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "EXPERT_PROJECTIONS",
    "CanonicalUnit",
    "ExpertKey",
    "canonical_units",
    "fuse_expert_tensors",
    "fused_key",
    "parse_fused_key",
    "parse_per_expert_key",
    "per_expert_key",
    "split_expert_tensors",
    "unit_view",
]

#: The three per-expert projections, in the order HF's module defines them.
EXPERT_PROJECTIONS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")

_PER_EXPERT_KEY = re.compile(
    r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<projection>gate_proj|up_proj|down_proj)\.weight$"
)
_FUSED_KEY = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<fused>gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class ExpertKey:
    """A parsed per-expert key: ``{prefix}.{expert}.{projection}.weight``."""

    prefix: str  # e.g. "model.layers.3.mlp.experts"
    expert: int
    projection: str  # one of EXPERT_PROJECTIONS


def per_expert_key(prefix: str, expert: int, projection: str) -> str:
    """The on-disk key of one expert's projection, e.g. ``...experts.5.gate_proj.weight``."""
    if projection not in EXPERT_PROJECTIONS:
        raise ValueError(f"unknown expert projection {projection!r}; expected one of {EXPERT_PROJECTIONS}")
    return f"{prefix}.{expert}.{projection}.weight"


def fused_key(prefix: str, fused_name: str) -> str:
    """The in-memory key of a fused expert tensor (``gate_up_proj`` or ``down_proj``)."""
    if fused_name not in ("gate_up_proj", "down_proj"):
        raise ValueError(f"unknown fused expert tensor {fused_name!r}; expected gate_up_proj or down_proj")
    return f"{prefix}.{fused_name}"


def parse_per_expert_key(key: str) -> ExpertKey | None:
    """Parse ``...experts.N.{gate,up,down}_proj.weight``; None for any other key."""
    match = _PER_EXPERT_KEY.match(key)
    if match is None:
        return None
    return ExpertKey(match["prefix"], int(match["expert"]), match["projection"])


def parse_fused_key(key: str) -> tuple[str, str] | None:
    """Parse ``...experts.gate_up_proj`` / ``...experts.down_proj`` into (prefix, fused name); else None."""
    match = _FUSED_KEY.match(key)
    if match is None:
        return None
    return match["prefix"], match["fused"]


@dataclass(frozen=True)
class CanonicalUnit:
    """One tensor of the canonical (per-expert) layout and where it lives in a checkpoint.

    A unit is either a whole stored tensor (``index == ()``) or one expert's matrix inside a fused
    tensor. Because the fused tensors are row-major and the expert index is the outermost dimension,
    every unit is one contiguous run of elements of its source tensor, starting at ``element_offset``.
    """

    name: str  # canonical key, e.g. "model.layers.0.mlp.experts.3.up_proj.weight"
    source_key: str  # key of the stored tensor that holds the unit
    shape: tuple[int, ...]  # shape of the unit itself
    index: tuple[int | slice, ...] = ()  # indexing of the source tensor that yields the unit
    element_offset: int = 0  # first element of the unit within the flattened source tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _fused_units(
    prefix: str, fused_name: str, source_key: str, shape: tuple[int, ...]
) -> list[CanonicalUnit]:
    """Split one fused tensor's shape into per-expert units, or [] when the shape is not the fused form."""
    if len(shape) != 3:
        return []
    num_experts, rows, cols = shape
    units: list[CanonicalUnit] = []
    if fused_name == "gate_up_proj":
        if rows % 2:
            return []
        half = rows // 2
        for expert in range(num_experts):
            base = expert * rows * cols
            for projection, first_row in (("gate_proj", 0), ("up_proj", half)):
                units.append(
                    CanonicalUnit(
                        name=per_expert_key(prefix, expert, projection),
                        source_key=source_key,
                        shape=(half, cols),
                        index=(expert, slice(first_row, first_row + half)),
                        element_offset=base + first_row * cols,
                    )
                )
    else:
        for expert in range(num_experts):
            units.append(
                CanonicalUnit(
                    name=per_expert_key(prefix, expert, "down_proj"),
                    source_key=source_key,
                    shape=(rows, cols),
                    index=(expert,),
                    element_offset=expert * rows * cols,
                )
            )
    return units


def canonical_units(shapes: Mapping[str, Sequence[int]]) -> dict[str, CanonicalUnit]:
    """Map a checkpoint's tensors (key -> shape) to canonical units, keyed by canonical name.

    Fused ``...experts.gate_up_proj [E, 2I, H]`` becomes ``E`` gate and ``E`` up units of ``[I, H]``;
    fused ``...experts.down_proj [E, H, I]`` becomes ``E`` down units of ``[H, I]``. Every other key,
    per-expert keys included, is its own unit. A fused key whose shape is not of that form (not 3-D,
    or an odd gate_up row count) is kept whole under its own key, so it shows up as an extra/missing
    key instead of being split wrongly.

    Units come back in the order of ``shapes``, fused tensors expanded in place.

    Raises:
        ValueError: two stored tensors map to the same canonical name (for example a checkpoint that
            holds both ``experts.gate_up_proj`` and ``experts.0.gate_proj.weight`` for one layer).
    """
    units: dict[str, CanonicalUnit] = {}
    for key, raw_shape in shapes.items():
        shape = tuple(int(dim) for dim in raw_shape)
        parsed = parse_fused_key(key)
        expanded = _fused_units(parsed[0], parsed[1], key, shape) if parsed else []
        if not expanded:
            expanded = [CanonicalUnit(name=key, source_key=key, shape=shape)]
        for unit in expanded:
            if unit.name in units:
                raise ValueError(
                    f"tensors {units[unit.name].source_key!r} and {unit.source_key!r} both hold "
                    f"{unit.name!r}; a checkpoint must store each layer's experts in one layout only"
                )
            units[unit.name] = unit
    return units


def unit_view(tensor: torch.Tensor, unit: CanonicalUnit) -> torch.Tensor:
    """The unit as a view of its source tensor (no copy)."""
    return tensor[unit.index] if unit.index else tensor


def fuse_expert_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn per-expert keys into the fused 3-D keys transformers 5 uses in memory.

    For every ``prefix = ...mlp.experts`` that has per-expert keys, experts ``0..E-1`` must all be
    present with all three projections of consistent shape and dtype. They are copied into freshly
    allocated ``{prefix}.gate_up_proj [E, 2I, H]`` (gate rows first) and ``{prefix}.down_proj
    [E, H, I]``. All other entries pass through unchanged (same tensor objects). Order is preserved;
    each fused tensor takes the place of its layer's first per-expert key.

    Raises:
        ValueError: an expert or projection is missing, shapes or dtypes disagree, or a layer has both
            per-expert and fused keys.
    """
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, tensor in state_dict.items():
        parsed = parse_per_expert_key(key)
        if parsed is not None:
            groups.setdefault(parsed.prefix, {}).setdefault(parsed.expert, {})[parsed.projection] = tensor
    for prefix in groups:
        for name in ("gate_up_proj", "down_proj"):
            if fused_key(prefix, name) in state_dict:
                raise ValueError(f"{prefix} has both per-expert keys and {fused_key(prefix, name)!r}")

    fused: dict[str, dict[str, torch.Tensor]] = {
        prefix: _fuse_group(prefix, g) for prefix, g in groups.items()
    }
    result: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        parsed = parse_per_expert_key(key)
        if parsed is None:
            result[key] = tensor
        elif parsed.prefix in fused:
            result.update(fused.pop(parsed.prefix))
    return result


def _fuse_group(prefix: str, experts: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    num_experts = max(experts) + 1
    absent = [e for e in range(num_experts) if e not in experts]
    if absent:
        raise ValueError(f"{prefix}: experts {absent[:8]} missing (expected 0..{num_experts - 1})")
    for expert, projections in experts.items():
        lacking = [p for p in EXPERT_PROJECTIONS if p not in projections]
        if lacking:
            raise ValueError(f"{prefix}.{expert}: missing {', '.join(lacking)}")

    first = experts[0]
    gate_shape, down_shape = tuple(first["gate_proj"].shape), tuple(first["down_proj"].shape)
    if len(gate_shape) != 2 or down_shape != gate_shape[::-1]:
        raise ValueError(
            f"{prefix}.0: gate_proj {gate_shape} and down_proj {down_shape} are not [I, H] / [H, I]"
        )
    intermediate, hidden = gate_shape
    dtype, device = first["gate_proj"].dtype, first["gate_proj"].device

    gate_up = torch.empty((num_experts, 2 * intermediate, hidden), dtype=dtype, device=device)
    down = torch.empty((num_experts, hidden, intermediate), dtype=dtype, device=device)
    for expert in range(num_experts):
        projections = experts[expert]
        for projection, expected in (
            ("gate_proj", gate_shape),
            ("up_proj", gate_shape),
            ("down_proj", down_shape),
        ):
            tensor = projections[projection]
            if tuple(tensor.shape) != expected or tensor.dtype != dtype:
                raise ValueError(
                    f"{per_expert_key(prefix, expert, projection)}: shape {tuple(tensor.shape)} dtype "
                    f"{tensor.dtype}, expected {expected} {dtype} like expert 0"
                )
        gate_up[expert, :intermediate].copy_(projections["gate_proj"])
        gate_up[expert, intermediate:].copy_(projections["up_proj"])
        down[expert].copy_(projections["down_proj"])
    return {fused_key(prefix, "gate_up_proj"): gate_up, fused_key(prefix, "down_proj"): down}


def split_expert_tensors(
    state_dict: Mapping[str, torch.Tensor], *, clone: bool = False
) -> dict[str, torch.Tensor]:
    """Inverse of ``fuse_expert_tensors``: fused 3-D expert tensors become per-expert keys.

    The per-expert tensors are views of the fused ones unless ``clone`` is true. Views cost no memory
    but share storage, which ``safetensors.torch.save_file`` refuses; pass ``clone=True`` to save the
    result. Keys are emitted expert by expert in place of each fused key; everything else passes
    through unchanged. A fused key with a shape that is not ``[E, 2I, H]`` / ``[E, H, I]`` is kept as is.
    """
    result: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        parsed = parse_fused_key(key)
        units = _fused_units(parsed[0], parsed[1], key, tuple(tensor.shape)) if parsed else []
        if not units:
            result[key] = tensor
            continue
        for unit in units:
            view = unit_view(tensor, unit)
            result[unit.name] = view.clone() if clone else view
    return result
