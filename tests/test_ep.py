"""`ep` (all-to-all expert parallelism) and the naive baseline train exactly what `single` trains."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moectl.config import build_config
from tests.util import NUMERICS_ARGS, assert_same_training, load_weights, run_moectl_in_process, train_run


@pytest.mark.parametrize("layout", ["ep", "ep_fsdp"])
def test_ep_matches_single(trained, single_reference, layout):
    """ep 2 (every expert on one rank of two; tokens exchanged in 2 chunks, checkpointing and the
    chunked loss on), and ep 2 on 4 processes with FSDP (experts replicated twice and sharded over their
    replicas, the dense part sharded over all four)."""
    assert_same_training(trained(layout), single_reference)


@pytest.mark.layouts("ep")
def test_full_state_dict_has_single_keys_shapes_and_every_expert(trained, single_reference):
    ep_weights, single_weights = (
        load_weights(trained("ep") / "model"),
        load_weights(single_reference / "model"),
    )
    assert {k: v.shape for k, v in ep_weights.items()} == {k: v.shape for k, v in single_weights.items()}
    cfg = build_config("tiny").model
    for expert in range(cfg.num_experts):  # all global expert indices, not just one rank's
        assert f"model.layers.0.mlp.experts.{expert}.down_proj.weight" in ep_weights
    # Rank 1's experts (4..7) differ from rank 0's and sit at their global indices.
    last = "model.layers.1.mlp.experts.7.gate_proj.weight"
    torch.testing.assert_close(ep_weights[last], single_weights[last], rtol=1e-5, atol=1e-7)
    assert not torch.equal(ep_weights[last], ep_weights["model.layers.1.mlp.experts.3.gate_proj.weight"])


# ---- badly unbalanced routing (the skewed model: tests/conftest.py) ----------------------------------
SKEWED_LAYOUTS = {
    # ep smaller than the world: two EP groups of 2, each with an idle rank; experts reduced by hand
    # over their replicas
    "ep2-on-4": ["--strategy", "ep", "--ep-size", "2", "--nproc", "4"],
    # (with FSDP2 sharding the experts over their replicas: tests/test_ep_scale.py, with chunks)
    # the naive baseline: its rank 1 holds only idle experts and must zero-fill their gradients
    "naive-ep2": ["--strategy", "examples/naive_ep/naive_ep.py", "--ep-size", "2"],
}


def _skewed_run(request, layout: str) -> Callable[[], Path]:
    run_dir = request.getfixturevalue("tmp_path_factory").mktemp(f"skewed-{layout}") / "run"
    args = [*SKEWED_LAYOUTS[layout], "--model", str(request.getfixturevalue("skewed_model")), *NUMERICS_ARGS]
    return lambda: train_run(run_dir, *args)


def start_ahead(lane, request, items) -> None:
    """The skewed runs start on the background lane."""
    lane.start_per_param(
        items,
        "test_unbalanced_routing_still_matches_single",
        "layout",
        lambda layout: _skewed_run(request, layout),
    )


@pytest.mark.parametrize("layout", list(SKEWED_LAYOUTS))
def test_unbalanced_routing_still_matches_single(request, background_lane, skewed_single, layout):
    """Idle experts, an idle EP rank and a hot one: still the same training, no hang."""
    key = ("test_unbalanced_routing_still_matches_single", layout)
    run = background_lane.result_or_run(key, lambda: _skewed_run(request, layout)())
    assert_same_training(run, skewed_single)


# ---- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, numbers",
    [
        (["--strategy", "ep", "--ep-size", "3"], ["3", "num_experts 8"]),
        (["--strategy", "ep", "--ep-size", "4", "--nproc", "6"], ["4", "world size 6"]),
        (
            ["--strategy", "examples/naive_ep/naive_ep.py", "--ep-size", "2", "--nproc", "4"],
            ["2", "world size 4"],
        ),
    ],
)
def test_bad_degrees_exit_2_with_one_line(tmp_path, args, numbers):
    result = run_moectl_in_process("train", *args, "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert all(number in lines[0] for number in numbers), lines[0]
    assert not (tmp_path / "run").exists()
