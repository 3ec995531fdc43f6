"""tp and mixed (dp × tp) train the same model as single; bad degrees are one-line usage errors."""

import sys

import pytest
import torch

from moectl.cli import main
from strategies.tp import gate_up_from_rank_blocks, gate_up_to_rank_blocks
from tests.util import NUMERICS_ARGS, assert_same_training, train_run


def test_gate_up_blocks_give_each_rank_matching_gate_and_up_rows():
    experts, width, hidden, tp_size = 3, 8, 5, 4
    full = torch.randn(experts, 2 * width, hidden)
    blocked = gate_up_to_rank_blocks(full, tp_size)
    piece = width // tp_size
    for rank, local in enumerate(blocked.chunk(tp_size, dim=1)):
        gate, up = local.chunk(2, dim=1)
        assert torch.equal(gate, full[:, rank * piece : (rank + 1) * piece])
        assert torch.equal(up, full[:, width + rank * piece : width + (rank + 1) * piece])
    assert torch.equal(gate_up_from_rank_blocks(blocked, tp_size), full)


def test_tp_matches_single(tmp_path, single_reference):
    # global batch 8, micro-batch 2, one data shard: 4 accumulated micro-batches per step
    run = train_run(tmp_path / "tp", "--strategy", "tp", "--tp-size", "2", *NUMERICS_ARGS)
    assert_same_training(run, single_reference)


def test_mixed_fsdp_matches_single(tmp_path, single_reference):
    run = train_run(
        tmp_path / "mixed", "--strategy", "mixed", "--dp-size", "2", "--tp-size", "2", *NUMERICS_ARGS
    )
    assert_same_training(run, single_reference)


def test_mixed_ddp_with_micro_batch_1_matches_single(tmp_path, single_reference):
    run = train_run(
        tmp_path / "mixed-ddp",
        "--strategy",
        "mixed",
        "--tp-size",
        "2",
        "--nproc",
        "4",
        *NUMERICS_ARGS,
        "--micro-batch",
        "1",
        "--set",
        "parallel.mixed_dp=ddp",
    )
    assert_same_training(run, single_reference)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            [
                "--strategy",
                "tp",
                "--tp-size",
                "2",
                "--set",
                "model.num_heads=3",
                "--set",
                "model.num_kv_heads=1",
            ],
            "--tp-size 2 does not divide model.num_heads = 3",
        ),
        (["--strategy", "tp", "--tp-size", "4"], "--tp-size 4 does not divide model.num_kv_heads = 2"),
        (
            ["--strategy", "tp", "--tp-size", "2", "--set", "model.moe_intermediate_size=33"],
            "--tp-size 2 does not divide model.moe_intermediate_size = 33",
        ),
        (
            ["--strategy", "mixed", "--dp-size", "2", "--tp-size", "2", "--nproc", "2"],
            "--dp-size 2 × --tp-size 2 = 4 must equal the world size 2",
        ),
        (["--strategy", "tp", "--tp-size", "2", "--nproc", "4"], "--tp-size 2 must equal the world size 4"),
    ],
)
def test_bad_degrees_are_one_line_usage_errors(tmp_path, monkeypatch, capsys, args, expected):
    # The real CLI entry point, in this process: validation runs before any worker or run directory.
    run_dir = tmp_path / "never"
    monkeypatch.setattr(sys, "argv", ["moectl", "train", "--run-dir", str(run_dir), *args])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert expected in lines[0]
    assert not run_dir.exists()
