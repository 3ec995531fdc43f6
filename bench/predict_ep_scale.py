"""Predicted bytes and step time of `ep` with the once-per-rank dispatch and `parallel.ep_chunks`, written
before any run on 4 or 8 GPUs (BENCHMARKS.md, "ep at scale: predictions"). Run: `python3 bench/predict_ep_scale.py`.

What it rests on: moectl.plan.predict's compute model with the figures fitted before any once-per-rank run
(`WRITTEN_WITH`, the fit of the morning of 2026-11-29: grouped-GEMM efficiency by rows per expert, the
all-to-all's 125 GB/s per GPU and direction on NVLink, the per-layer idle time, no dispatch work; the
refitted model is `moectl plan`'s, BENCHMARKS.md "`moectl plan`: predicted against measured"), the
exchange's bytes of moectl.parallel.expert_parallel (`exchange_bytes`), uniform routing (each token's top-k experts a uniformly random k-subset: real routing is
less even, so more ranks per token or hotter ranks), and three assumptions of this script, each named:
a small collective (counts, choices, weight gradients) costs LATENCY_S; a transfer that overlaps compute
slows that compute by INTERFERENCE of the transfer's time (NCCL's kernels take SMs); with C chunks what is
exposed per layer and micro-batch is the first chunk's dispatch and the last chunk's return (and their
backward twins), plus whatever of the rest the expert compute of the other chunks cannot cover.
"""

from __future__ import annotations

import dataclasses

from moectl.config import build_config
from moectl.parallel.expert_parallel import exchange_bytes, ranks_per_token
from moectl.plan.calibration import Calibration
from moectl.plan.predict import (
    BF16,
    GPU_KINDS,
    comm_seconds,
    compute_seconds,
    layout_strategy,
    planned,
)
from moectl.strategy import Layout

LATENCY_S = 30e-6  # one small NCCL collective within a node (assumed)
INTERFERENCE = 0.10  # share of an overlapped transfer's time added to the compute it overlaps (assumed)
#: The figures these predictions were written with, before the once-per-rank dispatch ran anywhere.
WRITTEN_WITH = Calibration(
    seconds_per_token_layer_compiled=2.35e-7,
    seconds_per_token_layer_eager=9.54e-7,
    seconds_per_layer_sync=9.1e-4,
    ep_dispatch_seconds_per_pair=0.0,
    all_to_all_bytes_per_s=125e9,
    ddp_overlap=0.045,
    fsdp_exposure=1.14,
)


def grouped_efficiency(rows_per_expert: float) -> float:
    return (
        WRITTEN_WITH.grouped_gemm_max
        * rows_per_expert
        / (rows_per_expert + WRITTEN_WITH.grouped_gemm_half_rows)
    )


@dataclasses.dataclass
class EpPrediction:
    ep: int
    chunks: int
    ranks_per_token: float
    bytes_old: float  # per rank and step, one copy per chosen expert
    bytes_new: float  # once per rank, choices and weight gradients included
    step_old_s: float
    step_new_s: float
    tokens_per_s_per_gpu: float


def predict(
    ep: int, chunks: int, num_gpus: int, global_batch: int, micro_batch: int = 2, num_layers: int = 48
) -> EpPrediction:
    overrides = {
        "train": {"seq_len": 4096, "global_batch": global_batch, "precision": "bf16"},
        "model": {"num_layers": num_layers},
    }
    cfg = build_config("qwen3-30b-a3b", overrides)
    model, train = cfg.model, planned(cfg.train, micro_batch, full_checkpointing=False, compile=True)
    gpu = GPU_KINDS["h200"]
    strategy = layout_strategy(model, "ep", Layout(num_gpus, ep_size=ep))
    cost = strategy.step_cost(train, num_gpus, BF16)
    num_micro = global_batch // (micro_batch * num_gpus)
    tokens = micro_batch * train.seq_len
    hidden, top_k, layers = model.hidden_size, model.top_k, model.num_layers
    others = (ep - 1) / ep

    compute = compute_seconds(model, train, strategy.dims, cost, gpu, WRITTEN_WITH, precision=BF16)
    comm = comm_seconds(cost, gpu, WRITTEN_WITH)
    rest = sum(seconds for name, seconds in comm.items() if name != "all-to-all")

    # Bytes per layer and micro-batch leaving this rank: before, one row per chosen expert on another rank,
    # 4 exchanges; now once per rank (moectl.parallel.expert_parallel.exchange_bytes: rows with their choices, rows back, and
    # the gradients of both).
    per_rank = ranks_per_token(model.num_experts, top_k, ep)
    old_layer = 4 * tokens * top_k * others * hidden * BF16.compute_bytes
    bytes_new = num_micro * layers * exchange_bytes(model, tokens, ep, BF16.compute_bytes, BF16.param_bytes)
    bytes_old = num_micro * layers * old_layer
    a2a_old = bytes_old / WRITTEN_WITH.all_to_all_bytes_per_s
    transfer_new = bytes_new / WRITTEN_WITH.all_to_all_bytes_per_s

    # Expert compute per step at the rows a chunk's grouped GEMM gets, and what chunking costs there.
    rows_per_expert = tokens * top_k * ep / model.num_experts
    expert_flops = 6 * tokens * layers * top_k * 3 * hidden * model.moe_intermediate_size * num_micro
    expert_s = expert_flops / gpu.peak_flops / grouped_efficiency(rows_per_expert / chunks)
    chunk_cost = expert_s - expert_flops / gpu.peak_flops / grouped_efficiency(rows_per_expert)

    # The choices (forward) and weight gradients (backward) of each chunk travel in collectives of their
    # own, latency-bound; the count exchange was one of the fitted run's collectives already.
    small = num_micro * layers * 2 * chunks * LATENCY_S
    if chunks == 1:
        exposed = transfer_new
    else:
        overlapped = transfer_new * (chunks - 1) / chunks
        uncovered = max(0.0, overlapped - expert_s * (chunks - 1) / chunks)
        exposed = transfer_new / chunks + uncovered + INTERFERENCE * (overlapped - uncovered)
    step_new = compute + chunk_cost + rest + small + exposed
    return EpPrediction(
        ep, chunks, per_rank, bytes_old, bytes_new, compute + rest + a2a_old, step_new,
        global_batch * train.seq_len / step_new / num_gpus,
    )  # fmt: skip


def main() -> None:
    print("| layers | GPUs | ep | ep_chunks | ranks per token | bytes/rank/step: one per choice | once per rank | cut |"
          " step: one per choice | predicted | tokens/s per GPU |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    cases = [(48, 2, 2, 4), (48, 4, 4, 4), (48, 8, 8, 4), (8, 1, 1, 8), (8, 2, 2, 8)]
    for num_layers, num_gpus, ep, sequences_per_gpu in cases:
        for chunks in (1, 2) if ep > 1 else (1,):
            p = predict(ep, chunks, num_gpus, sequences_per_gpu * num_gpus, num_layers=num_layers)
            print(
                f"| {num_layers} | {num_gpus} | {ep} | {chunks} | {p.ranks_per_token:.2f} | {p.bytes_old / 1e9:.1f} GB | "
                f"{p.bytes_new / 1e9:.1f} GB | {1 - p.bytes_new / p.bytes_old if p.bytes_old else 0:.0%} | {p.step_old_s:.2f} s | "
                f"{p.step_new_s:.2f} s | {p.tokens_per_s_per_gpu:,.0f} |"
            )


if __name__ == "__main__":
    main()
