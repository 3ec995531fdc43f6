"""`moectl plan`'s table: every layout of a machine predicted by moectl/plan/predict.py, ranked, with the
`moectl train` command that runs it, what does not fit, and the degrees the model forbids."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from moectl.config import (
    MAX_NODES,
    MAX_PROCESSES_PER_NODE,
    ModelConfig,
    TrainConfig,
    build_config,
    merge_overrides,
    parse_set_option,
)
from moectl.errors import UsageError
from moectl.plan.calibration import CALIBRATION, GPU_KINDS, Calibration
from moectl.plan.predict import (
    HEADROOM_GIB,
    SMALLEST_CALIBRATED_HIDDEN,
    Layout,
    Prediction,
    layout_problem,
    predict,
)
from moectl.tables import Column, output_console, show_table

MICRO_BATCHES = (1, 2, 4, 8)
#: the most memory per GPU --gpu-mem takes, in GiB (far beyond any GPU)
MAX_GPU_MEM_GIB = 100_000


@dataclass(frozen=True)
class PlanRow:
    layout: Layout
    prediction: Prediction
    does_not_fit: str | None  # what exceeds the memory; None when it fits
    command: str


@dataclass(frozen=True)
class Plan:
    rows: list[PlanRow]  # fitting layouts fastest first, then the others smallest first
    forbidden: list[tuple[Layout, str]]  # degree sets the model or the batch forbids, with the rule
    usable_gib: float


def candidate_degrees(num_gpus: int) -> list[Layout]:
    """Every strategy and degree set for the world, forbidden ones included (they are reported)."""
    if num_gpus == 1:
        return [Layout("single")]
    small = [d for d in range(1, math.isqrt(num_gpus) + 1) if num_gpus % d == 0]
    factors = sorted({*small, *(num_gpus // d for d in small)} - {1})
    out = [Layout("ddp", dp=num_gpus), Layout("fsdp", dp=num_gpus), Layout("tp", tp=num_gpus)]
    out += [Layout("mixed", dp=num_gpus // tp, tp=tp, mixed_dp=m) for tp in factors for m in ("fsdp", "ddp")]
    return out + [Layout("ep", dp=num_gpus, ep=ep, ep_fsdp=f) for ep in factors for f in (False, True)]


def make_plan(
    model: ModelConfig,
    train: TrainConfig,
    config_name: str,
    gpu: str,
    gpus_per_node: int,
    nodes: int,
    gpu_mem_gib: float,
    sets: tuple[str, ...] = (),
    cal: Calibration = CALIBRATION,
) -> Plan:
    """Every allowed layout (micro-batch, checkpointing and compile variants of each degree set) predicted."""
    num_gpus, usable = gpus_per_node * nodes, gpu_mem_gib - HEADROOM_GIB
    rows, forbidden = [], []
    for base in candidate_degrees(num_gpus):
        variants = [
            dataclasses.replace(base, micro_batch=mb, activation_checkpointing=ac, compile=compiled)
            for mb in MICRO_BATCHES
            for ac in (False, True)
            for compiled in (True, False)
        ]
        allowed = [v for v in variants if layout_problem(model, train.global_batch, v, num_gpus) is None]
        if not allowed:
            forbidden.append((base, layout_problem(model, train.global_batch, base, num_gpus) or ""))
        for layout in allowed:
            p = predict(model, train, layout, gpu, num_gpus, nodes, cal)
            m, why = p.memory, None
            if p.peak_mem_gib > usable:
                why = (
                    f"{p.peak_mem_gib:.1f} GiB > {usable:.1f} usable: weights + optimizer state "
                    f"{m.weights_and_optimizer:.1f}, activations {m.activations:.1f}, logits {m.logits:.1f}"
                    + (f", exchange buffers {m.buffers:.1f}" if m.buffers else "")
                )
            rows.append(
                PlanRow(layout, p, why, train_command(config_name, train, layout, gpus_per_node, nodes, sets))
            )
    rows.sort(
        key=lambda r: (
            (1, r.prediction.peak_mem_gib) if r.does_not_fit else (0, -r.prediction.tokens_per_s_per_gpu)
        )
    )
    return Plan(rows, forbidden, usable)


def train_command(
    config_name: str,
    train: TrainConfig,
    layout: Layout,
    gpus_per_node: int,
    nodes: int,
    sets: tuple[str, ...],
) -> str:
    """The `moectl train` command that runs the layout (on every node, each with its --node-rank)."""
    parts = ["moectl train", f"--config {config_name}", f"--strategy {layout.strategy}"]
    parts += [f"--ep-size {layout.ep}"] if layout.strategy == "ep" else []
    parts += [f"--dp-size {layout.dp}"] if layout.strategy == "mixed" else []
    parts += [f"--tp-size {layout.tp}"] if layout.strategy in ("tp", "mixed") else []
    parts += [f"--nproc {gpus_per_node}"] if layout.world > 1 else []
    parts += [f"--nnodes {nodes} --node-rank RANK --rdzv-endpoint HOST:PORT"] if nodes > 1 else []
    parts += [
        f"--global-batch {train.global_batch} --micro-batch {layout.micro_batch} --seq-len {train.seq_len}"
    ]
    parts += [f"--set {item}" for item in sets]
    if layout.activation_checkpointing != train.activation_checkpointing:
        parts.append(f"--set train.activation_checkpointing={str(layout.activation_checkpointing).lower()}")
    if layout.compile != train.compile:
        parts.append(f"--set train.compile={str(layout.compile).lower()}")
    parts += ["--set parallel.fsdp=true"] if layout.ep_fsdp else []
    parts += (
        [f"--set parallel.mixed_dp={layout.mixed_dp}"]
        if layout.strategy == "mixed" and layout.mixed_dp != "fsdp"
        else []
    )
    return " ".join(parts)


def shown_rows(plan: Plan, every_variant: bool) -> list[PlanRow]:
    """The fastest fitting variant of each degree set (or every variant), then, for degree sets where
    nothing fits, the variant that comes closest."""
    seen, shown = set(), []
    for row in plan.rows:
        lay = row.layout
        key = (lay.strategy, lay.dp, lay.tp, lay.ep, lay.ep_fsdp, lay.mixed_dp)
        if every_variant or key not in seen:
            shown.append(row)
        seen.add(key)
    return shown


def plan_json(plan: Plan, settings: dict, every_variant: bool) -> dict:
    rows = [
        {
            **dataclasses.asdict(row.layout),
            "label": row.layout.label(),
            "fits": row.does_not_fit is None,
            "does_not_fit": row.does_not_fit,
            **dataclasses.asdict(row.prediction),
            "command": row.command,
        }
        for row in shown_rows(plan, every_variant)
    ]
    forbidden = [
        {**dataclasses.asdict(lay), "label": lay.label(), "rule": rule} for lay, rule in plan.forbidden
    ]
    return {"settings": settings, "usable_gib": plan.usable_gib, "layouts": rows, "forbidden": forbidden}


def plan_command(
    config: str | None,
    gpus: int,
    nodes: int,
    gpu: str,
    gpu_mem_gib: float | None,
    seq_len: int | None,
    global_batch: int | None,
    sets: list[str],
    every_variant: bool,
    as_json: bool,
) -> None:
    """`moectl plan`: check the input, predict every layout, print the table (or JSON) on stdout."""
    if not 1 <= gpus <= MAX_PROCESSES_PER_NODE:
        raise UsageError(f"--gpus must be from 1 to {MAX_PROCESSES_PER_NODE:,} (GPUs per node), got {gpus}")
    if not 1 <= nodes <= MAX_NODES:
        raise UsageError(f"--nodes must be from 1 to {MAX_NODES:,}, got {nodes}")
    if gpu not in GPU_KINDS:
        raise UsageError(f"unknown --gpu {gpu!r}; the model has figures for: {', '.join(GPU_KINDS)}")
    if gpu_mem_gib is not None and not HEADROOM_GIB < gpu_mem_gib <= MAX_GPU_MEM_GIB:
        if not math.isfinite(gpu_mem_gib):
            raise UsageError(f"--gpu-mem must be a finite number of GiB, got {gpu_mem_gib}")
        if gpu_mem_gib > MAX_GPU_MEM_GIB:
            raise UsageError(f"--gpu-mem must be at most {MAX_GPU_MEM_GIB:,} GiB, got {gpu_mem_gib:g}")
        raise UsageError(
            f"--gpu-mem {gpu_mem_gib:g} GiB leaves nothing beyond the {HEADROOM_GIB:g} GiB headroom; "
            f"give more than {HEADROOM_GIB:g}"
        )
    train_flags = {
        k: v for k, v in {"seq_len": seq_len, "global_batch": global_batch}.items() if v is not None
    }
    cfg = build_config(config, merge_overrides(parse_set_option(sets), {"train": train_flags}))
    if cfg.model.path:  # the dimensions of a local checkpoint's config.json
        from pathlib import Path

        from moectl.model.build import model_config_from_hf_dir

        cfg.model = model_config_from_hf_dir(Path(cfg.model.path))
    memory = gpu_mem_gib or GPU_KINDS[gpu].memory_gib
    name = config or "tiny"
    plan = make_plan(cfg.model, cfg.train, name, gpu, gpus, nodes, memory, tuple(sets))
    settings = {
        "config": name,
        "gpu": gpu,
        "gpus_per_node": gpus,
        "nodes": nodes,
        "gpu_mem_gib": memory,
        "global_batch": cfg.train.global_batch,
        "seq_len": cfg.train.seq_len,
    }
    if as_json:
        print(json.dumps(plan_json(plan, settings, every_variant), indent=1))
        return
    console = output_console()
    headers = ("#", "strategy", "dp", "tp", "ep", "micro", "AC", "compile", "tokens/s/GPU", "MFU", "peak GiB",
               "comm", "fits")  # fmt: skip
    columns = [Column(h, "left" if h in ("strategy", "fits") else "right") for h in headers]
    rows = shown_rows(plan, every_variant)
    cells = [
        [
            str(number),
            row.layout.label(),
            str(row.layout.dp),
            str(row.layout.tp),
            str(row.layout.ep),
            str(row.layout.micro_batch),
            "on" if row.layout.activation_checkpointing else "off",
            "on" if row.layout.compile else "off",
            f"{row.prediction.tokens_per_s_per_gpu:,.0f}",
            f"{100 * row.prediction.mfu:.1f}%",
            f"{row.prediction.peak_mem_gib:.1f}",
            f"{100 * row.prediction.exposed_comm_s / row.prediction.step_time_s:.0f}%",
            "yes" if row.does_not_fit is None else "NO",
        ]
        for number, row in enumerate(rows, 1)
    ]
    title = (
        f"{name}: {gpus} × {nodes} {gpu} ({memory:g} GiB, {plan.usable_gib:g} usable), "
        f"global batch {cfg.train.global_batch} × {cfg.train.seq_len} tokens"
    )
    show_table(console, columns, cells, title=title, keys=2)
    # Commands stay whole on one line (copied as they are); the notes below them wrap at words.
    for line in [f"{n:>3}. {row.does_not_fit or row.command}" for n, row in enumerate(rows, 1)]:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    lines = [
        f"forbidden: {lay.label()} dp {lay.dp} tp {lay.tp} ep {lay.ep}: {rule}"
        for lay, rule in plan.forbidden
    ]
    lines.append(
        "comm = share of the step spent waiting for communication. The model and its calibration: "
        "moectl/plan/predict.py, moectl/plan/calibration.py, BENCHMARKS.md."
    )
    if nodes > 1:
        lines.append(
            f"Between nodes the model assumes {GPU_KINDS[gpu].network_bytes_per_s / 1e9:g} GB/s per GPU: "
            "no multi-node run has measured it."
        )
    if cfg.model.hidden_size < SMALLEST_CALIBRATED_HIDDEN:
        lines.append(
            f"Hidden size {cfg.model.hidden_size} is far below the calibrated runs' 2048: such small layers are "
            "launch-bound, and the speeds above are too high."
        )
    for line in lines:
        console.print(line, markup=False, highlight=False)
