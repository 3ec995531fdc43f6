"""The parallel layouts the suite trains, each once per session (tests/conftest.py `trained`).

RING layouts are also saved and resumed under another layout (tests/test_checkpoint.py PAIRS, which
insists that each of them saves and loads): add a layout there and it is checked as trainer, saver
and loader.
"""

from __future__ import annotations

import math

from tests.util import TENSORBOARD_ARGS

#: the chunked lm_head + loss (micro-batches of 2 x 64 tokens: chunks of 48, 48 and 32 tokens)
CHUNKED_LOSS = ["--set", "train.loss_chunk_tokens=48"]
#: activation checkpointing of every decoder layer
FULL_CHECKPOINTING = ["--set", "train.activation_checkpointing=true"]

# Speed levers ride on the shared layouts (chunked loss, checkpointing, ep chunks): each still trains
# `single`'s model, and one run checks a layout and its levers together. Every strategy with its
# defaults is checked too, on 4 processes over the preset's 40 steps: the README's bench showcase
# (tests/test_bench.py, test_every_strategy_runs_and_matches_the_reference).
RING: dict[str, list[str]] = {
    "single": ["--strategy", "single"],
    # 2 micro-batches per rank: DDP's no_sync; TensorBoard events (tests/test_console.py checks that
    # the launched run's outputs are complete)
    "ddp": ["--strategy", "ddp", "--nproc", "2", *TENSORBOARD_ARGS],
    # 4 micro-batches per rank (FSDP2's deferred reduce-scatter), checkpointing, and the chunked loss
    # (FSDP2 gathers the head inside the root's forward)
    "fsdp": [
        *("--strategy", "fsdp", "--nproc", "2", "--micro-batch", "1"),
        *FULL_CHECKPOINTING,
        *CHUNKED_LOSS,
    ],
    # ep 2 on 2 ranks exchanging tokens in 2 chunks, with checkpointing (the exchange replayed in the
    # backward) and the chunked loss
    "ep": [
        *("--strategy", "ep", "--ep-size", "2", "--set", "parallel.ep_chunks=2"),
        *FULL_CHECKPOINTING,
        *CHUNKED_LOSS,
    ],
    "ep_fsdp": ["--strategy", "ep", "--ep-size", "2", "--nproc", "4", "--set", "parallel.fsdp=true"],
    "tp": ["--strategy", "tp", "--tp-size", "2"],
    "mixed": ["--strategy", "mixed", "--dp-size", "2", "--tp-size", "2"],
}
LAYOUTS: dict[str, list[str]] = {
    **RING,
    # tp 2 x DDP 2, micro-batch 1, and the chunked loss (DDP hooks the head inside the root's forward;
    # the head's input is tp's replicated output)
    "mixed_ddp": [
        *("--strategy", "mixed", "--tp-size", "2", "--nproc", "4", "--micro-batch", "1"),
        *("--set", "parallel.mixed_dp=ddp"),
        *CHUNKED_LOSS,
    ],
    # With one process there is no peer and no process group: the model trains unwrapped.
    "ddp_one_process": ["--strategy", "ddp"],
    "fsdp_one_process": ["--strategy", "fsdp"],
}
#: train.precision=mixed: fp32 weights, gradients and optimizer state, bf16 compute (fp32 is the CPU default)
MIXED_PRECISION = ["--set", "train.precision=mixed"]
# Every strategy once more under mixed precision (tests/test_precision.py compares each with
# `single.mixed`), with the levers of its fp32 layout where they take another path under mixed (the
# chunked loss's casts, checkpointing's recompute of the casts, ep's chunks), and ep on 4 ranks with
# expert replicas, whose gradients are reduced by hand (without FSDP) or by FSDP2 over the replicas.
MIXED_PRECISION_LAYOUTS: dict[str, list[str]] = {
    "single.mixed": [*RING["single"], *MIXED_PRECISION],
    "ddp.mixed": [*RING["ddp"], *MIXED_PRECISION],
    "fsdp.mixed": [*RING["fsdp"], *MIXED_PRECISION],
    "tp.mixed": [*RING["tp"], *MIXED_PRECISION],
    "mixed.mixed": [*RING["mixed"], *MIXED_PRECISION],
    "mixed_ddp.mixed": [*LAYOUTS["mixed_ddp"], *MIXED_PRECISION],
    "ep.mixed": [*RING["ep"], "--nproc", "4", *MIXED_PRECISION],
    "ep_fsdp.mixed": [*RING["ep_fsdp"], *MIXED_PRECISION],
}
LAYOUTS.update(MIXED_PRECISION_LAYOUTS)

#: every layout run writes checkpoints at steps 2, 4, 6, 8 and keeps the newest three (2 is pruned)
CHECKPOINT_EVERY = 2
KEEP_CHECKPOINTS = 3
LAYOUT_RUN_ARGS = [
    "--checkpoint-every",
    str(CHECKPOINT_EVERY),
    "--set",
    f"train.keep_checkpoints={KEEP_CHECKPOINTS}",
]


def runs_in_one_process(args: list[str]) -> bool:
    """No --nproc and no degree above 1: the run needs no workers and can run in the test process."""
    degrees = ("--nproc", "--ep-size", "--tp-size", "--dp-size")
    return not any(flag in args and args[args.index(flag) + 1] != "1" for flag in degrees)


def world_size(args: list[str]) -> int:
    """The processes a layout's flags launch: --nproc, else the product of the degrees given."""
    if "--nproc" in args:
        return int(args[args.index("--nproc") + 1])
    degrees = [
        int(args[args.index(flag) + 1]) for flag in ("--dp-size", "--tp-size", "--ep-size") if flag in args
    ]
    return math.prod(degrees)
