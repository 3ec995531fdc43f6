"""Benchmark ``moectl compare-weights`` on two synthetic Qwen3-30B-shaped checkpoints.

Writes checkpoint A (fused expert layout, as ``model.state_dict()`` holds it) and checkpoint B (the
per-expert layout ``save_pretrained`` writes, values = A + small noise), both bf16 and sharded into
~``--shard-gb`` files with a ``model.safetensors.index.json``. Then it runs ``compare_checkpoints``
once to warm the page cache and ``--runs`` more times, each in a fresh subprocess so ``ru_maxrss`` is
that comparison's own peak, and prints a markdown table row with the median time, the throughput
(bytes of A + B read per second) and the peak RSS.

    PYTHONPATH=. python bench/compare_bench.py --dir /tmp/moectl-compare-bench --size-gb 8

The files are deleted afterwards unless ``--keep`` is given; an existing complete pair in ``--dir``
is reused when ``--keep`` was used before.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from moectl.config import build_config

if TYPE_CHECKING:
    import torch

# torch is imported only inside the subprocesses: ru_maxrss survives fork + exec, so a parent that
# had grown (generating data) would leak its peak into every child's measurement.

# Qwen3-30B-A3B's dimensions, read from its preset (moectl.config imports no torch).
QWEN = build_config("qwen3-30b-a3b").model
HIDDEN = QWEN.hidden_size
LAYERS_MAX = QWEN.num_layers
HEADS, KV_HEADS, HEAD_DIM = QWEN.num_heads, QWEN.num_kv_heads, QWEN.head_dim
EXPERTS = QWEN.num_experts
MOE_INTERMEDIATE = QWEN.moe_intermediate_size
VOCAB = QWEN.vocab_size
BF16_BYTES = 2


def layer_shapes(layer: int) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of one Qwen3-30B-A3B decoder layer in the fused (in-memory) layout."""
    prefix = f"model.layers.{layer}"
    return {
        f"{prefix}.input_layernorm.weight": (HIDDEN,),
        f"{prefix}.self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
        f"{prefix}.self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        f"{prefix}.self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        f"{prefix}.self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        f"{prefix}.self_attn.q_norm.weight": (HEAD_DIM,),
        f"{prefix}.self_attn.k_norm.weight": (HEAD_DIM,),
        f"{prefix}.post_attention_layernorm.weight": (HIDDEN,),
        f"{prefix}.mlp.gate.weight": (EXPERTS, HIDDEN),
        f"{prefix}.mlp.experts.gate_up_proj": (EXPERTS, 2 * MOE_INTERMEDIATE, HIDDEN),
        f"{prefix}.mlp.experts.down_proj": (EXPERTS, HIDDEN, MOE_INTERMEDIATE),
    }


def model_shapes(target_bytes: int) -> dict[str, tuple[int, ...]]:
    """Embedding, lm_head and the number of full layers that lands closest to ``target_bytes``."""

    def nbytes(shapes: dict[str, tuple[int, ...]]) -> int:
        return sum(math.prod(shape) for shape in shapes.values()) * BF16_BYTES

    ends = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }
    per_layer = nbytes(layer_shapes(0))
    layers = min(LAYERS_MAX, max(1, round((target_bytes - nbytes(ends)) / per_layer)))
    shapes = {"model.embed_tokens.weight": ends["model.embed_tokens.weight"]}
    for layer in range(layers):
        shapes.update(layer_shapes(layer))
    shapes["model.norm.weight"] = ends["model.norm.weight"]
    shapes["lm_head.weight"] = ends["lm_head.weight"]
    return shapes


def plan_shards(shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> list[list[str]]:
    """Greedy grouping of keys into shards of at most ``shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for key, shape in shapes.items():
        size = math.prod(shape) * BF16_BYTES
        if shards[-1] and filled + size > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(key)
        filled += size
    return shards


class RandomPool:
    """Normal-looking bf16 values cut from one pre-generated pool: generating 4 G fresh normals on a
    2-core CPU takes minutes and the values do not change how fast a comparison runs."""

    def __init__(self, elements: int, std: float, seed: int) -> None:
        import torch

        generator = torch.Generator().manual_seed(seed)
        self.values = torch.empty(elements, dtype=torch.bfloat16).normal_(0.0, std, generator=generator)
        self.offsets = torch.Generator().manual_seed(seed + 1)

    def tensor(self, shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        numel = math.prod(shape)
        out = torch.empty(numel, dtype=torch.bfloat16)
        pool = self.values.numel()
        filled = 0
        while filled < numel:
            start = int(torch.randint(0, pool // 2, (1,), generator=self.offsets))
            take = min(numel - filled, pool - start)
            out[filled : filled + take] = self.values[start : start + take]
            filled += take
        return out.view(shape)


def write_checkpoints(directory: Path, size_gb: float, shard_gb: float) -> tuple[Path, Path]:
    """Write A (fused, sharded) and B (per-expert, sharded, A + noise) into ``directory``."""
    from safetensors.torch import save_file

    from moectl.io.hf_layout import split_expert_tensors

    path_a, path_b = directory / "a_fused", directory / "b_per_expert"
    if (path_a / "model.safetensors.index.json").exists() and (
        path_b / "model.safetensors.index.json"
    ).exists():
        print(f"reusing checkpoints in {directory}", file=sys.stderr)
        return path_a, path_b
    for path in (path_a, path_b):
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    shapes = model_shapes(int(size_gb * 1e9))
    shards = plan_shards(shapes, int(shard_gb * 1e9))
    weights = RandomPool(64 << 20, std=0.02, seed=0)
    noise = RandomPool(64 << 20, std=0.02 * 3e-3, seed=2)
    maps: dict[Path, dict[str, str]] = {path_a: {}, path_b: {}}
    totals = {path_a: 0, path_b: 0}
    started = time.perf_counter()
    for number, keys in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors_a = {key: weights.tensor(shapes[key]) for key in keys}
        tensors_b = split_expert_tensors(
            {key: tensor + noise.tensor(tensor.shape) for key, tensor in tensors_a.items()}, clone=True
        )
        for path, tensors in ((path_a, tensors_a), (path_b, tensors_b)):
            save_file(tensors, str(path / name), metadata={"format": "pt"})
            maps[path].update(dict.fromkeys(tensors, name))
            totals[path] += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors_a, tensors_b
        print(f"wrote shard {number}/{len(shards)} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    for path in (path_a, path_b):
        index = {"metadata": {"total_size": totals[path]}, "weight_map": maps[path]}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path_a, path_b


@dataclass
class RunResult:
    seconds: float
    bytes_read: int
    peak_rss_bytes: int
    baseline_rss_bytes: int  # after imports, before the comparison
    vm_hwm_bytes: int
    global_rel_err: float
    tensors: int
    cpu_seconds: float  # user + system time of the comparison, all threads


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child_main(path_a: str, path_b: str) -> None:
    """One comparison in this fresh process; prints a JSON RunResult."""
    from moectl.compare import compare_checkpoints

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cpu_started, started = cpu_seconds(), time.perf_counter()
    report = compare_checkpoints(Path(path_a), Path(path_b), rtol=1e-2, progress=False)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    result = RunResult(
        seconds,
        report.bytes_read,
        peak,
        baseline,
        vm_hwm_bytes(),
        report.global_rel_err,
        len(report.tensors),
        cpu_seconds() - cpu_started,
    )
    print(json.dumps(result.__dict__))


def child_safe_open_main(path: str) -> None:
    """Reference point, not moectl: the same sums over A vs A, read with ``safetensors.safe_open`` and
    ``get_slice`` along dim 0 on one thread. Shows what the mmap + MADV_DONTNEED reader saves."""
    import torch
    from safetensors import safe_open

    torch.set_num_threads(1)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    index = json.loads((Path(path) / "model.safetensors.index.json").read_text())
    chunk_elements = 1 << 19
    bytes_read, diff_sq, ref_sq, tensors = 0, 0.0, 0.0, 0
    cpu_started, started = cpu_seconds(), time.perf_counter()
    for shard in dict.fromkeys(index["weight_map"].values()):
        shard_path = str(Path(path) / shard)
        with safe_open(shard_path, "pt") as left, safe_open(shard_path, "pt") as right:
            for key in left.keys():
                tensors += 1
                slice_a, slice_b = left.get_slice(key), right.get_slice(key)
                shape = slice_a.get_shape()
                step = max(1, chunk_elements // max(1, math.prod(shape[1:])))
                for row in range(0, shape[0] if shape else 1, step):
                    a = slice_a[row : row + step].float().flatten()
                    b = slice_b[row : row + step].float().flatten()
                    ref_sq += float(torch.dot(b, b))
                    a.sub_(b)
                    diff_sq += float(torch.dot(a, a))
                    torch.aminmax(a)
                    bytes_read += 2 * a.numel() * BF16_BYTES
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rel = math.sqrt(diff_sq / ref_sq) if ref_sq else 0.0
    cpu = cpu_seconds() - cpu_started
    print(
        json.dumps(RunResult(seconds, bytes_read, peak, baseline, vm_hwm_bytes(), rel, tensors, cpu).__dict__)
    )


def vm_hwm_bytes() -> int:
    """This process's own peak resident set (VmHWM), a cross-check of ru_maxrss; 0 where unavailable."""
    with suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_self(*arguments: str, capture: bool = True) -> str:
    """Run this script in a fresh interpreter with the repository on PYTHONPATH; return its stdout."""
    env = dict(os.environ)
    repo_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, __file__, *arguments],
        env=env,
        check=True,
        stdout=subprocess.PIPE if capture else None,
        text=True,
    )
    return completed.stdout or ""


def run_child(path_a: Path, path_b: Path) -> RunResult:
    output = run_self("--child", str(path_a), str(path_b))
    return RunResult(**json.loads(output.strip().splitlines()[-1]))


def cpu_name() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moectl-compare-bench"))
    parser.add_argument("--size-gb", type=float, default=8.0, help="approximate size of each checkpoint")
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints for another run")
    parser.add_argument(
        "--safe-open-baseline",
        action="store_true",
        help="also time A vs A with moectl and with a plain safetensors.safe_open loop, for reference",
    )
    parser.add_argument("--child", nargs=2, metavar=("A", "B"), help=argparse.SUPPRESS)
    parser.add_argument("--child-safe-open", metavar="A", help=argparse.SUPPRESS)
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(*args.child)
        return
    if args.child_safe_open:
        child_safe_open_main(args.child_safe_open)
        return
    if args.generate:
        write_checkpoints(args.dir, args.size_gb, args.shard_gb)
        return

    args.dir.mkdir(parents=True, exist_ok=True)
    path_a, path_b = args.dir / "a_fused", args.dir / "b_per_expert"
    try:
        generate = [
            "--generate",
            "--dir",
            str(args.dir),
            "--size-gb",
            str(args.size_gb),
            "--shard-gb",
            str(args.shard_gb),
        ]
        run_self(*generate, capture=False)
        shards = len(list(path_a.glob("*.safetensors")))
        warm = run_child(path_a, path_b)
        print(
            f"warm-up: {warm.seconds:.2f} s, {warm.bytes_read / warm.seconds / 1e9:.2f} GB/s", file=sys.stderr
        )
        load_before = os.getloadavg()[0]
        runs = [run_child(path_a, path_b) for _ in range(args.runs)]
        load_after = os.getloadavg()[0]
        baselines: dict[str, RunResult] = {}
        if args.safe_open_baseline:
            baselines["moectl, A vs A"] = run_child(path_a, path_a)
            output = run_self("--child-safe-open", str(path_a))
            baselines["safe_open loop, A vs A, 1 thread"] = RunResult(
                **json.loads(output.strip().splitlines()[-1])
            )
    finally:
        if not args.keep:
            shutil.rmtree(args.dir / "a_fused", ignore_errors=True)
            shutil.rmtree(args.dir / "b_per_expert", ignore_errors=True)

    for number, run in enumerate(runs, start=1):
        print(
            f"run {number}: {run.seconds:.2f} s, {run.bytes_read / run.seconds / 1e9:.2f} GB/s, "
            f"peak RSS {run.peak_rss_bytes / 2**20:.0f} MiB (VmHWM {run.vm_hwm_bytes / 2**20:.0f} MiB), "
            f"{run.cpu_seconds:.2f} CPU-s",
            file=sys.stderr,
        )
    median = statistics.median(run.seconds for run in runs)
    median_cpu = statistics.median(run.cpu_seconds for run in runs)
    bytes_read = runs[0].bytes_read
    print(
        "| date | CPU | A + B read | tensors compared | median of runs | GB/s | GB per CPU-second | peak RSS "
        "| RSS after imports | global rel err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {date.today().isoformat()} | {os.cpu_count()}-core {cpu_name()} | {bytes_read / 1e9:.2f} GB "
        f"({shards} shards each) | {runs[0].tensors} | {median:.2f} s (of {len(runs)}) "
        f"| {bytes_read / median / 1e9:.2f} | {bytes_read / median_cpu / 1e9:.2f} "
        f"| {max(r.peak_rss_bytes for r in runs) / 2**20:.0f} MiB "
        f"| {runs[0].baseline_rss_bytes / 2**20:.0f} MiB | {runs[0].global_rel_err:.2e} |"
    )
    print(f"\n1-minute load average before/after the measured runs: {load_before:.1f} / {load_after:.1f}")
    if baselines:
        print(
            "\n| reader (A vs A) | read | seconds | GB/s | GB per CPU-second | peak RSS | RSS after imports |"
        )
        print("|---|---|---|---|---|---|---|")
        for label, result in baselines.items():
            print(
                f"| {label} | {result.bytes_read / 1e9:.2f} GB | {result.seconds:.2f} "
                f"| {result.bytes_read / result.seconds / 1e9:.2f} "
                f"| {result.bytes_read / result.cpu_seconds / 1e9:.2f} "
                f"| {result.peak_rss_bytes / 2**20:.0f} MiB "
                f"| {result.baseline_rss_bytes / 2**20:.0f} MiB |"
            )


if __name__ == "__main__":
    main()
