"""`ep` (all-to-all expert parallelism) and the naive baseline train exactly what `single` trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moectl.config import build_config
from moectl.data import build_data
from moectl.hf_io import save_hf_model
from moectl.model import build_meta_model, hf_config, init_full_tensor, materialize
from tests.util import NUMERICS_ARGS, assert_same_training, load_weights, run_moectl, train_run

EP_LAYOUTS = {
    "ep2": ["--ep-size", "2"],
    "ep4": ["--ep-size", "4"],
    "ep2_on_4_replicated_experts": ["--ep-size", "2", "--nproc", "4"],
    "ep2_on_4_fsdp": ["--ep-size", "2", "--nproc", "4", "--set", "parallel.fsdp=true"],
}


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory):
    return train_run(
        tmp_path_factory.mktemp("ep2") / "run", "--strategy", "ep", *EP_LAYOUTS["ep2"], *NUMERICS_ARGS
    )


@pytest.mark.parametrize("layout", list(EP_LAYOUTS))
def test_ep_matches_single(tmp_path, single_reference, ep2_run, layout):
    if layout == "ep2":
        run = ep2_run
    else:
        run = train_run(tmp_path / layout, "--strategy", "ep", *EP_LAYOUTS[layout], *NUMERICS_ARGS)
    assert_same_training(run, single_reference)


def test_full_state_dict_has_single_keys_shapes_and_every_expert(single_reference, ep2_run):
    ep_weights, single_weights = load_weights(ep2_run / "model"), load_weights(single_reference / "model")
    assert {k: v.shape for k, v in ep_weights.items()} == {k: v.shape for k, v in single_weights.items()}
    cfg = build_config("tiny").model
    for expert in range(cfg.num_experts):  # all global expert indices, not just one rank's
        assert f"model.layers.0.mlp.experts.{expert}.down_proj.weight" in ep_weights
    # Rank 1's experts (4..7) differ from rank 0's and sit at their global indices.
    last = "model.layers.1.mlp.experts.7.gate_proj.weight"
    torch.testing.assert_close(ep_weights[last], single_weights[last], rtol=1e-5, atol=1e-7)


def test_naive_baseline_matches_single(tmp_path, single_reference):
    run = train_run(
        tmp_path / "naive", "--strategy", "examples/naive_ep/naive_ep.py", "--ep-size", "2", *NUMERICS_ARGS
    )
    assert_same_training(run, single_reference)


# ---- badly unbalanced routing -------------------------------------------------------------------
#: router preference along hidden dim 0, which the embeddings push up for every token
EXPERT_PREFERENCE = torch.tensor([3.0, 2.5, 1.0, 0.5, 0.2, -1.0, -3.0, -3.0])


@pytest.fixture(scope="module")
def skewed_checkpoint(tmp_path_factory) -> Path:
    """Tiny model whose router sends ~90 % of rows to experts 0-1 and none to experts 6-7.

    Every embedding gets a constant component on hidden dim 0 and every router row a weight on that
    dim that falls with the expert index, so with ep 4 rank 0 receives most rows and rank 3 none.
    """
    cfg = build_config("tiny").model
    meta = build_meta_model(cfg, torch.float32)
    state = {n: init_full_tensor(n, p.shape, cfg, 0, torch.device("cpu")) for n, p in meta.named_parameters()}
    state["model.embed_tokens.weight"][:, 0] = 0.05
    for layer in range(cfg.num_layers):
        state[f"model.layers.{layer}.mlp.gate.weight"][:, 0] = 0.1 * EXPERT_PREFERENCE
    directory = tmp_path_factory.mktemp("skewed") / "model"
    save_hf_model(state, hf_config(cfg), directory)

    model = build_meta_model(cfg, torch.float32)
    materialize(model, torch.device("cpu"), lambda name, shape, device: state[name])
    counts = []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(
            lambda module, args, out: counts.append(torch.bincount(out[2].flatten(), minlength=8))
        )
    tokens = build_data(build_config("tiny").data, cfg.vocab_size, 0).global_batch(0, 8, 64)
    with torch.no_grad():
        model(input_ids=tokens[:, :-1])
    for per_expert in counts:
        assert per_expert[6:].sum() == 0 and per_expert[:2].sum() > 0.8 * per_expert.sum(), per_expert
    return directory


@pytest.fixture(scope="module")
def skewed_single(tmp_path_factory, skewed_checkpoint) -> Path:
    run_dir = tmp_path_factory.mktemp("skewed_single") / "run"
    return train_run(run_dir, "--strategy", "single", "--model", str(skewed_checkpoint), *NUMERICS_ARGS)


@pytest.mark.parametrize("strategy", ["ep", "examples/naive_ep/naive_ep.py"])
def test_unbalanced_routing_still_matches_single(tmp_path, skewed_checkpoint, skewed_single, strategy):
    """Idle experts, an idle EP rank (rank 3 gets no rows) and a hot rank 0: still exact, no hang."""
    args = ["--strategy", strategy, "--ep-size", "4", "--model", str(skewed_checkpoint), *NUMERICS_ARGS]
    assert_same_training(train_run(tmp_path / "run", *args), skewed_single)


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
    result = run_moectl("train", *args, "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert all(number in lines[0] for number in numbers), lines[0]
    assert not (tmp_path / "run").exists()
