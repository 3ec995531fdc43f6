"""Re-fit `moectl plan`'s fitted figures from the measured runs and print predicted against measured.

    python3 bench/fit_plan.py            # the tables with the figures in moectl/plan/calibration.py
    python3 bench/fit_plan.py --fit      # least-squares re-fit (relative step time), then write the figures
                                         # into moectl/plan/calibration.py and the tables into BENCHMARKS.md
    python3 bench/fit_plan.py --fit --dry-run   # re-fit and print, write nothing
    python3 bench/fit_plan.py --docs     # write the tables of the current figures into BENCHMARKS.md
    python3 bench/fit_plan.py --pending  # only the predictions of the runs scripted but not run yet

New runs: add their `MeasuredRun` lines to moectl/plan/calibration.py (role "fit" or "holdout"; runs of code that
has changed since: role "superseded" with the note), then `--fit`. Each fitted figure enters the step time
linearly (a time per token and layer or per pair, an idle time per layer, 1 / bandwidth, an exposed share),
so each group is one weighted linear least-squares solve over the runs whose role is "fit"; runs with any
other role never move a figure. The tables live in BENCHMARKS.md between `<!-- fit_plan: NAME -->` and
`<!-- /fit_plan -->`; tests/test_plan.py checks that they are this script's output.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import numpy as np

from moectl.config import build_config
from moectl.plan.calibration import CALIBRATION, MEASURED_RUNS, Calibration, MeasuredRun
from moectl.plan.predict import collective_bytes, predict, run_config
from moectl.plan.table import make_plan, shown_rows

ROOT = Path(__file__).resolve().parent.parent
DATA, DOCS = ROOT / "moectl" / "plan" / "calibration.py", ROOT / "BENCHMARKS.md"
CHECKED = ("fit", "holdout", "profiled")  # the roles held to the bounds (tests/test_plan.py)

# (figures, the runs that set them); each group is solved with the figures of the groups before it.
GROUPS = [
    (
        ("seconds_per_token_layer_compiled", "seconds_per_layer_sync", "seconds_per_token_layer_hf_experts"),
        lambda r: r.world == 1 and r.compile,
    ),
    (("seconds_per_token_layer_eager",), lambda r: r.world == 1 and not r.compile),
    (("all_to_all_bytes_per_s", "ep_dispatch_seconds_per_pair"), lambda r: r.strategy == "ep" and r.ep > 1),
    (("ddp_overlap",), lambda r: r.strategy == "ddp"),
    (("fsdp_exposure",), lambda r: r.strategy == "fsdp"),
]
INVERSE = {"all_to_all_bytes_per_s"}  # enters as 1 / figure
COMPLEMENT = {"ddp_overlap"}  # enters as 1 - figure
#: Figures that are shares: a fit outside [0, 1] (more than the whole transfer exposed, or more than all of it
#: hidden) is clamped to the bound, and the fit says so. Each sits alone in its group, so the clamped value is
#: the constrained least-squares solution.
SHARES = {"ddp_overlap"}
#: How each fitted figure reads in the docs: (unit, scale).
UNITS = {
    "seconds_per_token_layer_compiled": ("ns per token and layer", 1e9),
    "seconds_per_layer_sync": ("ms per layer and micro-batch", 1e3),
    "seconds_per_token_layer_hf_experts": (
        "ns per token and layer (transformers' experts, beyond ep's)",
        1e9,
    ),
    "seconds_per_token_layer_eager": ("ns per token and layer", 1e9),
    "all_to_all_bytes_per_s": ("GB/s per GPU", 1e-9),
    "ep_dispatch_seconds_per_pair": ("ns per (token, expert) pair, layer and micro-batch", 1e9),
    "ddp_overlap": ("% of the all-reduce hidden", 100),
    "fsdp_exposure": ("× the transfer time", 1),
}


def step_time(run: MeasuredRun, cal: Calibration) -> float:
    return _prediction(run, cal).step_time_s


def measured_step_time(run: MeasuredRun) -> float:
    return run.global_batch * run.seq_len / (run.tokens_per_s_per_gpu * run.world)


def _from_linear(name: str, value: float) -> float:
    """The figure whose linear coefficient in the step time is `value` (the map is its own inverse)."""
    return 1 / value if name in INVERSE else (1 - value if name in COMPLEMENT else value)


def fit_runs(selects) -> list[MeasuredRun]:
    return [r for r in MEASURED_RUNS if r.role == "fit" and selects(r)]


def fit(cal: Calibration, verbose: bool = True) -> Calibration:
    for names, selects in GROUPS:
        runs = fit_runs(selects)
        if len(runs) < len(names):
            raise SystemExit(f"{', '.join(names)}: {len(runs)} fit runs for {len(names)} figures")
        zero = dataclasses.replace(cal, **{n: _from_linear(n, 1e-30 if n in INVERSE else 0.0) for n in names})
        base = np.array([step_time(r, zero) for r in runs])
        columns = []
        for name in names:
            unit = dataclasses.replace(zero, **{name: _from_linear(name, 1.0)})
            columns.append([step_time(r, unit) for r in runs] - base)
        measured = np.array([measured_step_time(r) for r in runs])
        matrix = np.array(columns).T / measured[:, None]
        solution, _, rank, _ = np.linalg.lstsq(matrix, 1 - base / measured, rcond=None)
        if rank < len(names):  # e.g. ep runs of one degree only: bytes and pairs grow together
            raise SystemExit(
                f"{', '.join(names)}: the fit runs ({', '.join(r.name for r in runs)}) cannot tell them apart"
            )
        figures = {n: _from_linear(n, float(x)) for n, x in zip(names, solution, strict=True)}
        for name in SHARES & set(names):
            if not 0 <= figures[name] <= 1:
                print(f"{name}: the fit gives {figures[name]:.3g}, clamped to [0, 1]")
                figures[name] = min(max(figures[name], 0.0), 1.0)
        cal = dataclasses.replace(cal, **figures)
        if verbose:
            print(", ".join(f"{n} = {getattr(cal, n):.4g}" for n in names), f"(from {len(runs)} runs)")
    return cal


def _literal(value: float) -> str:
    """Three significant digits, as moectl/plan/calibration.py writes its figures (125e9, 2.35e-7, 0.045)."""
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{float(f'{value:.3g}'):g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def write_figures(cal: Calibration, path: Path = DATA) -> None:
    """Rewrite the value of every fitted figure in moectl/plan/calibration.py's `Calibration` (its comment stays)."""
    text = path.read_text()
    for names, _ in GROUPS:
        for name in names:
            pattern = rf"^(    {name}: float = )\S+$"
            text, count = re.subn(pattern, rf"\g<1>{_literal(getattr(cal, name))}", text, flags=re.MULTILINE)
            if count != 1:
                raise SystemExit(f"{path}: no single line '    {name}: float = …'")
    path.write_text(text)


def rounded(cal: Calibration) -> Calibration:
    """The figures as moectl/plan/calibration.py stores them."""
    names = [n for names, _ in GROUPS for n in names]
    return dataclasses.replace(cal, **{n: float(_literal(getattr(cal, n))) for n in names})


# ---- the tables -------------------------------------------------------------------------------------
def _prediction(run: MeasuredRun, cal: Calibration):
    train, strategy = run_config(run)
    return predict(strategy, train, run.gpu, cal=cal)


def figures_table(cal: Calibration) -> str:
    rows = ["| fitted figure | value | fitted on (role fit) |", "| --- | --- | --- |"]
    for names, selects in GROUPS:
        runs = ", ".join(r.name for r in fit_runs(selects))
        for name in names:
            unit, scale = UNITS[name]
            value = f"{getattr(cal, name) * scale:.3g} {unit}"
            if name == "ep_dispatch_seconds_per_pair":  # what one layer of two 4,096-token sequences costs
                value += f" ({getattr(cal, name) * 2 * 4096 * 8 * 1e3:.1f} ms per layer and micro-batch of 2 × 4,096 tokens)"
            rows.append(f"| `{name}` | {value} | {runs} |")
    return "\n".join(rows)


def table(cal: Calibration) -> str:
    rows = [
        "| run | date | role | tokens/s per GPU: measured | predicted | error | peak GiB: measured | predicted "
        "| error | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in MEASURED_RUNS:
        if run.role == "pending":
            continue
        if run.role == "out of scope":
            rows.append(
                f"| {run.name} | {run.date} | {run.role} | {run.tokens_per_s_per_gpu:,.0f} | — | — "
                f"| {run.peak_mem_gib:.2f} | — | — | {run.note} |"
            )
            continue
        p = _prediction(run, cal)
        speed = p.tokens_per_s_per_gpu / run.tokens_per_s_per_gpu - 1
        memory = p.peak_mem_gib / run.peak_mem_gib - 1
        rows.append(
            f"| {run.name} | {run.date} | {run.role} | {run.tokens_per_s_per_gpu:,.0f} | "
            f"{p.tokens_per_s_per_gpu:,.0f} | {100 * speed:+.1f} % | {run.peak_mem_gib:.2f} | "
            f"{p.peak_mem_gib:.2f} | {100 * memory:+.1f} % | {run.note} |"
        )
    return "\n".join(rows)


def errors(cal: Calibration) -> list[tuple[MeasuredRun, float, float]]:
    """(run, tokens/s error, memory error) of every run held to the bounds."""
    out = []
    for run in (r for r in MEASURED_RUNS if r.role in CHECKED):
        p = _prediction(run, cal)
        speed, memory = p.tokens_per_s_per_gpu / run.tokens_per_s_per_gpu, p.peak_mem_gib / run.peak_mem_gib
        out.append((run, speed - 1, memory - 1))
    return out


def worst(cal: Calibration) -> str:
    found = errors(cal)
    speed = max(found, key=lambda e: abs(e[1]))
    memory = max(found, key=lambda e: abs(e[2]))
    by_role = {role: sum(1 for e in found if e[0].role == role) for role in CHECKED}
    counted = ", ".join(f"{n} {role}" for role, n in by_role.items())
    return (
        f"Every fit, holdout and profiled run ({counted}): tokens/s within **{100 * abs(speed[1]):.1f} %** "
        f"({speed[0].name}, {100 * speed[1]:+.1f} %; bound 15 %), peak memory within **{100 * abs(memory[2]):.1f} %** "
        f"({memory[0].name}, {100 * memory[2]:+.1f} %; bound 5 %)."
    )


def bytes_table(cal: Calibration) -> str:
    rows = [
        "| run | ep | bytes sent per rank and step: measured (`a2a_bytes_per_step`) | model | error |",
        "| --- | --- | --- | --- | --- |",
    ]
    for run in (r for r in MEASURED_RUNS if r.a2a_bytes_per_step):
        train, strategy = run_config(run)
        sent = collective_bytes(strategy, train, "all-to-all")
        rows.append(
            f"| {run.name} | {run.ep} | {run.a2a_bytes_per_step / 1e9:.2f} GB | {sent / 1e9:.2f} GB "
            f"| {100 * (sent / run.a2a_bytes_per_step - 1):+.1f} % |"
        )
    return "\n".join(rows)


def before_table(cal: Calibration) -> str:
    rows = [
        "| run | tokens/s per GPU: predicted before the run | measured | predicted now | peak GiB: predicted before "
        "| measured | predicted now |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in (r for r in MEASURED_RUNS if r.predicted_before and r.role != "pending"):
        p = _prediction(run, cal)
        tokens, memory = run.predicted_before
        rows.append(
            f"| {run.name} | {tokens:,.0f} ({100 * (tokens / run.tokens_per_s_per_gpu - 1):+.1f} %) | "
            f"{run.tokens_per_s_per_gpu:,.0f} | {p.tokens_per_s_per_gpu:,.0f} "
            f"({100 * (p.tokens_per_s_per_gpu / run.tokens_per_s_per_gpu - 1):+.1f} %) | {memory:.1f} | "
            f"{run.peak_mem_gib:.2f} | {p.peak_mem_gib:.1f} |"
        )
    return "\n".join(rows)


def pending_table(cal: Calibration) -> str:
    rows = [
        "| run | script (run name) | tokens/s per GPU | MFU | step time | exposed comm | peak GiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in (r for r in MEASURED_RUNS if r.role == "pending"):
        p = _prediction(run, cal)
        comm = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in p.comm_s.items()) or "—"
        rows.append(
            f"| {run.name} | {run.script} ({run.recipe.split()[1]}) | {p.tokens_per_s_per_gpu:,.0f} | "
            f"{100 * p.mfu:.1f} % | {p.step_time_s:.2f} s | {comm} | {p.peak_mem_gib:.1f} |"
        )
    return "\n".join(rows)


def plan_table(cal: Calibration, gpu_counts=(4, 8)) -> str:
    """`moectl plan --config qwen3-30b-a3b --gpus N --gpu-mem 141 --seq-len 4096 --global-batch 64`: the
    fastest fitting variant of each degree set, then the degree sets where nothing fits."""
    rows = [
        "| GPUs | layout (dp × tp, ep) | micro-batch | AC | loss chunk | tokens/s per GPU | MFU | exposed comm "
        "| ep dispatch | peak GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    # bf16, as the measured runs beside it (BENCHMARKS.md's tables of `mixed` come from `moectl plan` itself)
    train = {"seq_len": 4096, "global_batch": 64, "precision": "bf16"}
    cfg = build_config("qwen3-30b-a3b", {"train": train})
    for gpus in gpu_counts:
        plan = make_plan(cfg.model, cfg.train, "qwen3-30b-a3b", "h200", gpus, 1, 141.0, cal=cal)
        for row in shown_rows(plan, every_variant=False):
            lay, p = row.layout, row.prediction
            degrees = f"{lay.dp} × {lay.tp}" + (f", ep {lay.ep}" if lay.ep > 1 else "")
            chunk = f"{lay.loss_chunk_tokens:,}" if lay.loss_chunk_tokens else "off"
            head = (
                f"| {gpus} | {lay.label} ({degrees}) | {lay.micro_batch} | "
                f"{'on' if lay.activation_checkpointing else 'off'} | {chunk} |"
            )
            if row.does_not_fit:
                m = p.memory
                rows.append(
                    f"{head} does not fit: {p.peak_mem_gib:.1f} GiB (weights + optimizer state "
                    f"{m.weights_and_optimizer:.1f}) | | | | |"
                )
                continue
            rows.append(
                f"{head} {p.tokens_per_s_per_gpu:,.0f} | {100 * p.mfu:.1f} % | "
                f"{100 * p.exposed_comm_s / p.step_time_s:.0f} % | {100 * p.ep_dispatch_s / p.step_time_s:.0f} % "
                f"| {p.peak_mem_gib:.1f} |"
            )
    return "\n".join(rows)


def blocks(cal: Calibration) -> dict[str, str]:
    """BENCHMARKS.md's generated tables, by marker name."""
    return {
        "figures": figures_table(cal),
        "measured": table(cal),
        "worst": worst(cal),
        "bytes": bytes_table(cal),
        "before": before_table(cal),
        "plan": plan_table(cal),
        "pending": pending_table(cal),
    }


BLOCK = re.compile(r"(<!-- fit_plan: (\w+) -->\n)(.*?)(<!-- /fit_plan -->)", re.DOTALL)


def documented_blocks(path: Path = DOCS) -> dict[str, str]:
    return {m[2]: m[3].rstrip("\n") for m in BLOCK.finditer(path.read_text())}


def write_docs(generated: dict[str, str], path: Path = DOCS) -> None:
    text = path.read_text()
    missing = set(generated) - set(documented_blocks(path))
    if missing:
        raise SystemExit(f"{path}: no <!-- fit_plan: NAME --> block for {', '.join(sorted(missing))}")
    path.write_text(BLOCK.sub(lambda m: f"{m[1]}{generated[m[2]]}\n{m[4]}", text))


def main(argv: list[str]) -> None:
    cal = CALIBRATION
    if "--fit" in argv:
        cal = rounded(fit(cal))
        if "--dry-run" not in argv:
            write_figures(cal)
            print(f"wrote the fitted figures into {DATA.relative_to(ROOT)}")
    if "--pending" in argv:
        print(pending_table(cal))
        return
    generated = blocks(cal)
    for name, text in generated.items():
        print(f"<!-- fit_plan: {name} -->\n{text}\n")
    if ("--fit" in argv or "--docs" in argv) and "--dry-run" not in argv:
        write_docs(generated)
        print(f"wrote the tables into {DOCS.relative_to(ROOT)}")
    elif documented_blocks() != generated:
        print(f"{DOCS.relative_to(ROOT)}'s tables differ from these: --docs writes them", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
