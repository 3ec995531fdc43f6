"""The parallel layouts the suite trains, each once per session (tests/conftest.py `trained`).

RING layouts are also saved and resumed under another layout (tests/test_checkpoint.py PAIRS, which
insists that each of them saves and loads): add a layout there and it is checked as trainer, saver
and loader.
"""

from __future__ import annotations

RING: dict[str, list[str]] = {
    "single": ["--strategy", "single"],
    "ddp": ["--strategy", "ddp", "--nproc", "2"],  # 2 micro-batches per rank: DDP's no_sync
    # 4 micro-batches per rank (FSDP2's deferred reduce-scatter) and activation checkpointing
    "fsdp": [
        "--strategy",
        "fsdp",
        "--nproc",
        "2",
        "--micro-batch",
        "1",
        "--set",
        "train.activation_checkpointing=true",
    ],
    "ep": ["--strategy", "ep", "--ep-size", "2"],
    "ep_fsdp": ["--strategy", "ep", "--ep-size", "2", "--nproc", "4", "--set", "parallel.fsdp=true"],
    "tp": ["--strategy", "tp", "--tp-size", "2"],
    "mixed": ["--strategy", "mixed", "--dp-size", "2", "--tp-size", "2"],
}
LAYOUTS: dict[str, list[str]] = {
    **RING,
    "mixed_ddp": [
        "--strategy",
        "mixed",
        "--tp-size",
        "2",
        "--nproc",
        "4",
        "--micro-batch",
        "1",
        "--set",
        "parallel.mixed_dp=ddp",
    ],
    # With one process there is no peer and no process group: the model trains unwrapped.
    "ddp_one_process": ["--strategy", "ddp"],
    "fsdp_one_process": ["--strategy", "fsdp"],
}
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
