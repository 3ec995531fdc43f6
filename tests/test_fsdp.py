"""`fsdp` (FSDP2): same training as `single`, sharded parameters, deferred gradient sync, bad degrees refused."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from moectl.config import ModelConfig, build_config
from moectl.model.build import build_meta_model, materialize, random_init_source
from moectl.model.sizing import count_params
from moectl.parallel.data_parallel import fully_shard_layers
from moectl.parallel.dims import ParallelDims
from strategies.fsdp import FSDP
from tests.util import assert_same_training, run_moectl_in_process


@pytest.mark.layouts("fsdp")
def test_fsdp_matches_single(trained, single_reference):
    """2 processes, 4 micro-batches each (the reduce-scatter deferred to the last), activation
    checkpointing and the chunked loss on (tests/layouts.py); fsdp on 4 processes runs under ep_fsdp
    and mixed, and with its defaults in the README's bench showcase."""
    assert_same_training(trained("fsdp"), single_reference)


@pytest.fixture
def one_rank_group(tmp_path):
    """A real gloo process group of one rank, so FSDP2 runs in this process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp_shards_meta_model_and_defers_grad_sync(one_rank_group):
    """Parameters become dim-0 DTensor shards filled with the reference init; the reduce waits for the last micro-batch.

    (Full state dicts are checked against `single` key by key in the multi-process runs above.)
    """
    model_cfg = ModelConfig()
    strategy = FSDP(ParallelDims(1, dp=1), model_cfg)
    device, source = torch.device("cpu"), random_init_source(model_cfg, seed=0)
    model = build_meta_model(model_cfg, torch.float32)
    fully_shard_layers(model, init_device_mesh("cpu", (1,), mesh_dim_names=("dp",)))
    materialize(model, device, source, strategy.shard)
    for name, param in model.named_parameters():
        assert isinstance(param, DTensor) and param.placements == (Shard(0),), name
        expected = source(name, param.shape, device)
        assert torch.equal(param.full_tensor(), expected), name

    tokens = torch.randint(0, model_cfg.vocab_size, (2, 9))
    with strategy.no_sync(model, is_last_micro_batch=False):
        model(input_ids=tokens[:, :-1]).logits.sum().backward()
    assert all(p.grad is None for p in model.parameters()), (
        "gradients were reduced before the last micro-batch"
    )
    with strategy.no_sync(model, is_last_micro_batch=True):
        model(input_ids=tokens[:, :-1]).logits.sum().backward()
    assert all(isinstance(p.grad, DTensor) for p in model.parameters())


def test_fsdp_dry_run_counts_parameters_per_rank():
    result = run_moectl_in_process(
        "train", "--strategy", "fsdp", "--nproc", "4", "--global-batch", "16", "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    total = count_params(build_config("tiny").model).total
    line = next(line for line in result.stdout.splitlines() if "parameters per rank" in line)
    assert f"({round(total / 4):,})" in line, line  # the exact count, beside the human-unit one


@pytest.mark.parametrize(
    ("flags", "numbers"),
    [
        (["--nproc", "2", "--dp-size", "4"], ["--dp-size 4", "world size 2"]),
        (["--nproc", "2", "--tp-size", "2"], ["--tp-size"]),
        (["--nproc", "4", "--global-batch", "6", "--micro-batch", "1"], ["global batch 6", "= 4"]),
    ],
)
def test_fsdp_bad_degrees_are_refused(tmp_path, flags, numbers):
    run_dir = tmp_path / "never"
    result = run_moectl_in_process("train", "--strategy", "fsdp", "--run-dir", str(run_dir), *flags)
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip()
    assert message.startswith("error:") and "\n" not in message
    assert all(number in message for number in numbers), message
    assert not run_dir.exists()
