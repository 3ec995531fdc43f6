"""What a launch costs the user: `moectl train` from start to exit, with workers forked from the worker
server against workers spawned as new interpreters (moectl.run.launch.WORKER_START_METHOD).

    python bench/launch_latency.py [--runs 3] [--baseline CHECKOUT] [--methods forkserver,spawn]

Each command runs `--runs` times per variant, the variants alternating. Per run it prints:
- wall: from starting the launcher to its exit (what the user waits for);
- after: from the launcher's last line of output to its exit (what leaving the interpreter costs);
- tree: until the last process the launch started has ended (the worker server ends after the
  launcher);
- cpu: user + system seconds of every process the launch started (this script reaps them all as a
  child subreaper, so processes that outlive the launcher count too);
- load: the 1-minute load average as the run started (the machine's other work).

`--baseline CHECKOUT` adds a variant: another checkout of moectl run as it is (its own start method),
through this interpreter with CHECKOUT first on the import path.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMANDS = {
    "ddp 2": ["--strategy", "ddp", "--nproc", "2", "--steps", "8"],
    "ep 4": ["--strategy", "ep", "--ep-size", "4", "--nproc", "4", "--steps", "8"],
}
# The launcher with its start method set first (the console entry point otherwise).
WITH_METHOD = (
    "import sys; import moectl.run.launch as launch; launch.WORKER_START_METHOD = sys.argv.pop(1); "
    "from moectl.cli import main; main()"
)
PR_SET_CHILD_SUBREAPER = 36


def _cpu_of_reaped() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _reap_all() -> None:
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return


def one_launch(argv: list[str], env: dict[str, str], cwd: Path) -> dict[str, float]:
    load = os.getloadavg()[0]
    cpu_before = _cpu_of_reaped()
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    last_output = [started]
    lines: list[bytes] = []

    def read() -> None:
        for line in process.stdout:
            last_output[0] = time.monotonic()
            lines.append(line)

    reader = threading.Thread(target=read)
    reader.start()
    code = process.wait()
    exited = time.monotonic()
    reader.join()
    _reap_all()  # the worker server and anything else the launcher left running
    tree_done = time.monotonic()
    if code != 0:
        sys.exit(
            f"launch failed ({code}): {' '.join(argv)}\n{b''.join(lines[-20:]).decode(errors='replace')}"
        )
    return {
        "wall": exited - started,
        "after": exited - last_output[0],
        "tree": tree_done - started,
        "cpu": _cpu_of_reaped() - cpu_before,
        "load": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--methods", default="forkserver,spawn")
    parser.add_argument("--baseline", type=Path, help="another checkout of moectl, run as it is")
    args = parser.parse_args()
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1)

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    variants: dict[str, tuple[list[str], dict[str, str]]] = {}
    for method in args.methods.split(","):
        pythonpath = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        variants[method] = ([sys.executable, "-c", WITH_METHOD, method], {**env, "PYTHONPATH": pythonpath})
    if args.baseline:
        pythonpath = os.pathsep.join([str(args.baseline.resolve()), env.get("PYTHONPATH", "")])
        variants["baseline"] = ([sys.executable, "-m", "moectl"], {**env, "PYTHONPATH": pythonpath})

    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for run in range(args.runs):
            for command, flags in COMMANDS.items():
                for variant, (prefix, variant_env) in variants.items():
                    run_dir = Path(scratch) / f"{variant}-{command.replace(' ', '')}-{run}"
                    # Started outside any checkout: its directory would come first on the import path.
                    figures = one_launch(
                        [*prefix, "train", *flags, "--run-dir", str(run_dir)], variant_env, Path(scratch)
                    )
                    results.setdefault((command, variant), []).append(figures)
                    print(
                        f"{command:5} {variant:10} run {run + 1}: "
                        + ", ".join(f"{key} {value:.2f}" for key, value in figures.items()),
                        flush=True,
                    )

    print("\n| command | variant | wall (s) | after the last line (s) | tree ended (s) | CPU (s) | load |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (command, variant), runs in results.items():

        def cell(key: str, runs=runs) -> str:
            values = [f"{figures[key]:.2f}" for figures in runs]
            median = statistics.median(figures[key] for figures in runs)
            return f"{', '.join(values)} (median {median:.2f})"

        loads = [figures["load"] for figures in runs]
        print(
            f"| `{command}` | {variant} | {cell('wall')} | {cell('after')} | {cell('tree')} | {cell('cpu')} "
            f"| {min(loads):.1f}–{max(loads):.1f} |"
        )


if __name__ == "__main__":
    main()
