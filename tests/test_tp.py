"""tp and mixed (dp × tp) train the same model as single; bad degrees are one-line usage errors."""

import subprocess
import sys

import pytest
import torch

from moectl.cli import main
from moectl.parallel.tensor_parallel import gate_up_from_rank_blocks, gate_up_to_rank_blocks
from tests.util import assert_same_training


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


@pytest.mark.parametrize("layout", ["tp", "mixed", "mixed_ddp"])
def test_tensor_parallel_layouts_match_single(trained, single_reference, layout):
    """tp 2 (4 accumulated micro-batches on one data shard); mixed dp 2 × tp 2 over FSDP; mixed
    tp 2 × dp 2 over DDP with micro-batch 1 and the chunked loss (tests/layouts.py)."""
    assert_same_training(trained(layout), single_reference)


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
        (["--strategy", "tp", "--tp-size", "8"], "--tp-size 8 does not divide model.num_kv_heads = 4"),
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


def test_optimizer_groups_never_mix_dtensors_and_plain_tensors():
    """tp holds DTensors (sharded attention, experts) beside plain tensors (embedding, norms); foreach
    kernels, the default on GPUs, refuse such a mix. Forced here on the CPU, each group still steps.
    In a child process: a gloo group that DTensor's caches keep alive can abort at interpreter exit."""
    code = "from tests.test_tp import check_optimizer_groups; check_optimizer_groups()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def check_optimizer_groups() -> None:
    import os

    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from moectl.config import TrainConfig
    from moectl.run.loop import build_optimizer

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(0)]))
    optimizer = build_optimizer(model, TrainConfig(lr=0.1, momentum=0.9, weight_decay=0.01))
    kinds = [{isinstance(p, DTensor) for p in group["params"]} for group in optimizer.param_groups]
    assert sorted(map(sorted, kinds)) == [[False], [True]], kinds
    before = model[0].weight.full_tensor().clone()
    for group in optimizer.param_groups:
        group["foreach"] = True
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    assert not torch.equal(model[0].weight.full_tensor(), before)
    dist.destroy_process_group()
    os._exit(0)
