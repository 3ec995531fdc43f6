"""Loss curves of runs that differ in one lever (FP8 against bf16, say), step by step: the largest gap, the
gap over the last 10 steps, and a plot of both curves with their difference.

    python3 bench/loss_curves.py RUN_DIR_REFERENCE RUN_DIR_OTHER [--plot OUT.png]

Each RUN_DIR holds the metrics.jsonl `moectl train` writes. Prints one Markdown row per other run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.jsonl") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    return [row["loss"] for row in sorted(rows, key=lambda row: row["step"])]


def compare(reference: list[float], other: list[float]) -> dict[str, float]:
    steps = min(len(reference), len(other))
    gaps = [other[i] - reference[i] for i in range(steps)]
    tail = gaps[-10:]
    return {
        "steps": steps,
        "max_abs_gap": max(abs(gap) for gap in gaps),
        "mean_gap_last_10": sum(tail) / len(tail),
        "first": other[0],
        "last": other[steps - 1],
        "reference_last": reference[steps - 1],
    }


def plot(named: dict[str, list[float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (reference_name, reference), *others = named.items()
    figure, (curves, gaps) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (name, values) in enumerate(named.items()):
        curves.plot(range(1, len(values) + 1), values, label=name, color=colors[index % len(colors)])
    for index, (name, values) in enumerate(others, start=1):
        steps = min(len(values), len(reference))
        gaps.plot(
            range(1, steps + 1),
            [values[i] - reference[i] for i in range(steps)],
            label=name,
            color=colors[index % len(colors)],
        )
    curves.set_ylabel("loss")
    curves.legend()
    gaps.legend(fontsize="small")
    gaps.axhline(0, color="grey", linewidth=0.5)
    gaps.set_ylabel(f"loss − {reference_name}")
    gaps.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("reference", type=Path)
    parser.add_argument("others", type=Path, nargs="+")
    parser.add_argument("--plot", type=Path, help="write both curves and their gap as a PNG")
    args = parser.parse_args()
    named = {args.reference.name: losses(args.reference)}
    named.update({run.name: losses(run) for run in args.others})
    reference = named[args.reference.name]
    print("| run | against | steps | largest gap | mean gap, last 10 | final loss | reference's |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for run in args.others:
        row = compare(reference, named[run.name])
        print(
            f"| {run.name} | {args.reference.name} | {row['steps']} | {row['max_abs_gap']:.4f} | "
            f"{row['mean_gap_last_10']:+.4f} | {row['last']:.4f} | {row['reference_last']:.4f} |"
        )
    if args.plot:
        plot(named, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
