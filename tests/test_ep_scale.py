"""`ep` at scale: each token sent once per destination rank, `parallel.ep_chunks` pipelining, activation
checkpointing that neither routes nor communicates again, a hot rank stopping every rank cleanly, and
`a2a_bytes_per_step` — each checked against `single` or a dense reference."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.checkpoint import checkpoint

from moectl.parallel import ep_dispatch
from moectl.parallel.ep_dispatch import (
    DispatchStats,
    ExpertParallelMoE,
    GatherRows,
    GroupedExperts,
    SumSlots,
    WeightedSumSlots,
    chunk_bounds,
    expert_rows,
    pair_index,
)
from moectl.parallel.ep_recompute import checkpoint_contexts
from moectl.run.faults import ExpertOverload
from tests.ep_blocks import ep_block_over, gloo_ranks, tiny_hf_block
from tests.util import (
    NUMERICS_ARGS,
    assert_same_training,
    losses,
    run_moectl,
    run_moectl_in_process,
    train_run,
)


# ---- index arithmetic and the gather/sum autograd functions (in process) -----------------------------
@pytest.mark.parametrize("seed", range(4))
def test_pair_index_sorts_choices_by_expert_and_keeps_row_order(seed):
    generator = torch.Generator().manual_seed(seed)
    num_rows, top_k, num_local = 9, 3, 4
    ids = torch.randint(-1, num_local, (num_rows, top_k), generator=generator)
    ids[2] = -1  # a row none of whose choices are here cannot occur, but the arithmetic must not care
    pairs = [(row, j) for row in range(num_rows) for j in range(top_k) if ids[row, j] >= 0]
    expected = sorted(pairs, key=lambda pair: (int(ids[pair]), pair[0], pair[1]))
    index = pair_index(ids, num_local, len(pairs))
    assert index.pair_row.tolist() == [row for row, _ in expected]
    assert index.pair_choice.tolist() == [row * top_k + j for row, j in expected]
    for row in range(num_rows):
        for j in range(top_k):
            want = expected.index((row, j)) if ids[row, j] >= 0 else len(pairs)
            assert index.slots[row, j] == want


def test_chunk_bounds_cover_every_token_once():
    assert chunk_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert chunk_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]


def _random_pairs(seed: int, num_rows=6, top_k=3, num_local=4):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, num_local, (num_rows, top_k), generator=generator)
    ids[:, 0] = ids[:, 0].clamp(min=0)  # every row has a choice here
    return ids, pair_index(ids, num_local, int((ids >= 0).sum())), generator


@pytest.mark.parametrize("seed", range(3))
def test_gather_and_slot_sums_have_autograds_gradients(seed):
    """GatherRows, SumSlots and WeightedSumSlots (gather-only backwards) against index_select / index_add
    autograd, in float64."""
    ids, index, generator = _random_pairs(seed)
    num_rows, num_pairs, hidden = ids.shape[0], index.pair_row.numel(), 5
    rows = torch.randn(num_rows, hidden, dtype=torch.float64, generator=generator)
    upstream = torch.randn(num_pairs, hidden, dtype=torch.float64, generator=generator)

    ours, ref = rows.clone().requires_grad_(), rows.clone().requires_grad_()
    (GatherRows.apply(ours, index.pair_row, index.slots) * upstream).sum().backward()
    (ref.index_select(0, index.pair_row) * upstream).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad)

    pairs = torch.randn(num_pairs, hidden, dtype=torch.float64, generator=generator)
    weights = torch.rand(num_rows, ids.shape[1], dtype=torch.float64, generator=generator) * (ids >= 0)
    row_grad = torch.randn(num_rows, hidden, dtype=torch.float64, generator=generator)
    ours_p, ours_w = pairs.clone().requires_grad_(), weights.clone().requires_grad_()
    out = WeightedSumSlots.apply(ours_p, ours_w, index.slots, index.pair_row, index.pair_choice)
    (out * row_grad).sum().backward()
    ref_p, ref_w = pairs.clone().requires_grad_(), weights.clone().requires_grad_()
    pair_weight = ref_w.reshape(-1).index_select(0, index.pair_choice).unsqueeze(-1)
    expected = torch.zeros(num_rows, hidden, dtype=torch.float64).index_add(
        0, index.pair_row, ref_p * pair_weight
    )
    (expected * row_grad).sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(ours_p.grad, ref_p.grad)
    torch.testing.assert_close(ours_w.grad, ref_w.grad)

    source = pairs.clone().requires_grad_()
    summed = SumSlots.apply(
        torch.cat([source, source.new_zeros(1, hidden)]), index.slots, index.pair_row, True
    )
    (summed * row_grad).sum().backward()
    torch.testing.assert_close(
        summed, torch.zeros(num_rows, hidden, dtype=torch.float64).index_add(0, index.pair_row, pairs)
    )
    torch.testing.assert_close(source.grad, row_grad.index_select(0, index.pair_row))


def test_expert_rows_compiles_once_for_changing_row_counts():
    """The compiled expert path the GPU takes (bf16 grouped GEMM with device offsets, no host sizes),
    traced by dynamo and AOTAutograd on the CPU (torch's CPU grouped GEMM), for two different row counts:
    equal to the same path run eagerly and close to the per-expert loop, forward and backward, with one
    compiled graph for both."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(expert_rows, backend=counter, dynamic=True)
    generator = torch.Generator().manual_seed(0)
    num_local, hidden, width, top_k = 4, 16, 8, 2
    bf16 = {"dtype": torch.bfloat16}
    gate_up = torch.randn(num_local, 2 * width, hidden, generator=generator).to(**bf16).requires_grad_()
    down = torch.randn(num_local, hidden, width, generator=generator).to(**bf16).requires_grad_()
    for num_rows in (7, 11):
        ids = torch.randint(-1, num_local, (num_rows, top_k), generator=generator)
        ids[:, 0] = ids[:, 0].clamp(min=0)
        index = pair_index(ids, num_local, int((ids >= 0).sum()))
        counts = torch.bincount(ids[ids >= 0], minlength=num_local)
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        rows = torch.randn(num_rows, hidden, generator=generator).to(**bf16).requires_grad_()
        weights = (torch.rand(num_rows, top_k, generator=generator) * (ids >= 0)).to(**bf16)
        args = (rows, weights, index.pair_row, index.pair_choice, index.slots, offsets, gate_up, down)
        silu = torch.nn.functional.silu
        try:
            eager = expert_rows(*args, silu, None)
        except (NotImplementedError, RuntimeError) as exc:  # no CPU grouped GEMM in this torch build
            pytest.skip(f"torch grouped_mm unavailable on the CPU: {exc}")
        out = compiled(*args, silu, None)
        loop = expert_rows(*args, silu, counts.tolist())
        torch.testing.assert_close(out, eager, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(out, loop, rtol=2e-2, atol=5e-2)
        grads = torch.autograd.grad(out.float().sum(), (rows, gate_up))
        eager_grads = torch.autograd.grad(eager.float().sum(), (rows, gate_up))
        for got, want in zip(grads, eager_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    assert counter.frame_count == 1, "a recompile for a new row count"


def test_load_check_without_a_factor_compares_with_each_ranks_free_memory():
    """No ep_max_rows_factor: a rank stops the run when the rows routed to it need more memory than it has
    free (each rank's free bytes travel in the count exchange); -1 (the CPU) means no limit."""
    _, hf_block = tiny_hf_block()
    block = _ep_block_on_one_process(hf_block)
    limit = block.load_limit(torch.float32)
    pairs, rows = [30, 10], [20, 8]  # one EP group of 2 ranks
    need = [p * limit.bytes_per_pair + r * limit.bytes_per_row for p, r in zip(pairs, rows, strict=True)]
    block._check_load(pairs, rows, [need[0], need[1]], [0, 1], num_groups=1)  # fits exactly
    block._check_load(pairs, rows, [-1, -1], [0, 1], num_groups=1)  # no limit known
    with pytest.raises(ExpertOverload, match=r"EP rank 1 \(rank 1\) would receive 10 .* 0.50× .* GiB"):
        block._check_load(pairs, rows, [need[0], need[1] - 1], [0, 1], num_groups=1)


def _ep_block_on_one_process(hf_block) -> ExpertParallelMoE:
    experts = GroupedExperts(
        hf_block.experts.gate_up_proj, hf_block.experts.down_proj, hf_block.experts.act_fn
    )
    block = ExpertParallelMoE(hf_block.gate, experts, hf_block.experts.num_experts, None, 1)
    block.ep_size = 2  # as seen by the load check of a 2-rank EP group
    return block


# ---- the block on 2 gloo ranks against transformers' block ---------------------------------------------
class _CollectiveCounter:
    """Counts the dispatch's collectives by wrapping torch.distributed's functions it calls."""

    def __init__(self):
        self.calls = 0
        self._all_to_all, self._gather = dist.all_to_all_single, ep_dispatch._all_gather_single

    def __enter__(self):
        def count(function):
            def counted(*args, **kwargs):
                self.calls += 1
                return function(*args, **kwargs)

            return counted

        dist.all_to_all_single = count(self._all_to_all)
        ep_dispatch._all_gather_single = count(self._gather)
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single, ep_dispatch._all_gather_single = self._all_to_all, self._gather


def _expected_bytes(hf_block, x, rank, world, top_k, hidden) -> int:
    """Bytes this rank sends to the other rank per forward + backward, from the reference routing."""
    _, _, ids = hf_block.gate(x.reshape(-1, hidden))
    local = hf_block.experts.num_experts // world
    goes = torch.zeros(ids.shape[0], world, dtype=torch.bool).scatter_(1, ids // local, True)
    to_other = int(goes[:, 1 - rank].sum())
    from_other = torch.tensor(to_other)
    dist.all_reduce(from_other)  # 2 ranks: the sum minus mine is what the other sends me
    from_other = int(from_other) - to_other
    row, choices, weight = 4 * hidden, 4 * 2 * top_k, 4 * top_k
    return to_other * (row + choices) + from_other * row + from_other * (row + weight) + to_other * row


def _block_worker(rank: int, world: int, init_file: str) -> None:
    with gloo_ranks(init_file, rank, world):
        torch.set_num_threads(1)
        cfg, hf_block = tiny_hf_block()
        with torch.no_grad():  # a skewed router: rank 0's experts get most rows
            hf_block.gate.weight[: cfg.num_experts // world] += 0.5 * hf_block.gate.weight[0].sign()
        generator = torch.Generator().manual_seed(10 + rank)  # every rank holds different tokens
        x = (
            torch.randn(2, 9 + rank, cfg.hidden_size, generator=generator).abs()
            * hf_block.gate.weight[0].detach().sign()
        )
        upstream = torch.randn(x.shape, generator=generator)
        x_ref = x.clone().requires_grad_()
        (hf_block(x_ref) * upstream).sum().backward()
        out_ref = hf_block(x)
        expert_grads = {}
        for name in ("gate_up_proj", "down_proj"):
            summed = getattr(hf_block.experts, name).grad.clone()
            dist.all_reduce(summed)
            local = cfg.num_experts // world
            expert_grads[name] = summed[rank * local : (rank + 1) * local]

        collectives = {}
        for num_chunks in (1, 2, 5):
            for recompute in (False, True):
                stats = DispatchStats()
                block = ep_block_over(
                    hf_block, dist.group.WORLD, world, rank, num_chunks=num_chunks, stats=stats
                )
                x_ep = x.clone().requires_grad_()
                with _CollectiveCounter() as counter:
                    if recompute:
                        out = checkpoint(block, x_ep, use_reentrant=False, context_fn=checkpoint_contexts)
                    else:
                        out = block(x_ep)
                    (out * upstream).sum().backward()
                torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(x_ep.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(
                    block.gate.weight.grad, hf_block.gate.weight.grad, rtol=1e-5, atol=1e-6
                )
                for name, want in expert_grads.items():
                    torch.testing.assert_close(getattr(block.experts, name).grad, want, rtol=1e-5, atol=1e-6)
                assert len(block._tapes) == 0  # every recorded forward was replayed
                assert stats.collectives == counter.calls
                collectives[num_chunks, recompute] = counter.calls
                expected = _expected_bytes(hf_block, x, rank, world, cfg.top_k, cfg.hidden_size)
                assert stats.take()["a2a_bytes_per_step"] == expected
        for num_chunks in (1, 2, 5):
            # one count exchange; per chunk rows + choices and the return forward, their three backwards
            assert collectives[num_chunks, False] == collectives[num_chunks, True] == 1 + 6 * num_chunks

        # A router that sends every token to rank 0's experts: both ranks stop at the same layer.
        block = ep_block_over(hf_block, dist.group.WORLD, world, rank, max_rows_factor=1.5, layer_index=3)
        with torch.no_grad():
            block.gate.weight[: cfg.num_experts // world] += 100 * block.gate.weight[0].sign()
        with pytest.raises(ExpertOverload) as stopped:
            block(x)
        message = str(stopped.value)
        assert "layer 3" in message and "EP rank 0 (rank 0)" in message and "2.00×" in message, message
        assert "parallel.ep_max_rows_factor=1.5" in message, message


def test_two_rank_block_matches_transformers_with_chunks_and_checkpointing(tmp_path):
    """Forward and backward of the EP block on 2 gloo ranks under skewed routing, 1, 2 and 5 chunks (some
    chunks carry no row for a rank), with and without activation checkpointing: outputs and every gradient
    equal transformers' block; checkpointing issues exactly the collectives of a plain run (the recompute
    replays); a2a_bytes_per_step matches the routing; a hot rank stops both ranks with one message."""
    mp.spawn(_block_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


# ---- whole runs against `single` ------------------------------------------------------------------------
# The skewed model and its `single` run: tests/conftest.py (experts 4-7 get no row: at ep 4 two ranks
# idle, rank 0 hot). ep 2 in 2 chunks with checkpointing on the preset's own routing is the shared `ep`
# layout (tests/layouts.py, checked in test_ep.py and below).
AC = ["--set", "train.activation_checkpointing=true"]
FSDP = ["--set", "parallel.fsdp=true"]
SCALE_LAYOUTS = {
    "ep4_chunks4_ac_skewed": ["--ep-size", "4", "--set", "parallel.ep_chunks=4", *AC],
    "ep2_on_4_fsdp_ac_chunks2_skewed": [
        *("--ep-size", "2", "--nproc", "4", "--set", "parallel.ep_chunks=2"),
        *FSDP,
        *AC,
    ],
    "ep4_fsdp_chunks2_skewed": ["--ep-size", "4", "--set", "parallel.ep_chunks=2", *FSDP],
}


def assert_exchanged_tokens(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["a2a_bytes_per_step"] > 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(record["a2a_bytes_per_step"] > 0 for record in metrics)


def _scale_run(request, layout: str) -> Callable[[], Path]:
    run_dir = request.getfixturevalue("tmp_path_factory").mktemp(f"scale-{layout}") / "run"
    args = [*SCALE_LAYOUTS[layout], "--model", str(request.getfixturevalue("skewed_model"))]
    return lambda: train_run(run_dir, "--strategy", "ep", *args, *NUMERICS_ARGS)


def start_ahead(lane, request, items) -> None:
    """The runs at scale (4 processes each) start on the background lane."""
    lane.start_per_param(
        items,
        "test_ep_at_scale_trains_what_single_trains",
        "layout",
        lambda layout: _scale_run(request, layout),
    )


@pytest.mark.parametrize("layout", list(SCALE_LAYOUTS))
def test_ep_at_scale_trains_what_single_trains(request, background_lane, skewed_single, layout):
    """ep at 2 and 4, with and without FSDP (with expert replicas, and without: experts then stay out of
    FSDP), with checkpointing, chunks and skewed routing: every tensor's update as `single`'s."""
    key = ("test_ep_at_scale_trains_what_single_trains", layout)
    run = background_lane.result_or_run(key, lambda: _scale_run(request, layout)())
    assert_same_training(run, skewed_single)
    assert_exchanged_tokens(run)


@pytest.mark.layouts("ep")
def test_the_shared_ep_layout_counts_its_exchanges(trained):
    """(Its numerics: test_ep.py.)"""
    assert_exchanged_tokens(trained("ep"))


HOT_ROUTER_PLUGIN = '''
"""`ep` whose routers, from the second step on, send every token to EP rank 0's experts."""
import torch
from torch import nn

from moectl.model.build import decoder_layers
from moectl.registry import get_strategy


class HotRouter(nn.Module):
    def __init__(self, gate, forwards_before):
        super().__init__()
        self.gate, self.forwards, self.forwards_before = gate, 0, forwards_before

    def forward(self, x):
        logits, scores, ids = self.gate(x)
        self.forwards += 1
        if self.forwards > self.forwards_before:
            ids = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)  # experts 0..k-1: EP rank 0's
        return logits, scores, ids


class HotEP(get_strategy("ep")):
    name = "hot_ep"

    def parallelize(self, model, materialize, train):
        model = super().parallelize(model, materialize, train)
        micro_batches = train.global_batch // (train.micro_batch * self.dims.dp)
        for layer in decoder_layers(model):
            layer.mlp.gate = HotRouter(layer.mlp.gate, micro_batches)
        return model
'''


def test_hot_rank_stops_every_rank_with_one_line(tmp_path):
    """A router that sends everything to rank 0's experts (2× its share at ep 2), from step 2 on: every
    rank stops at the first MoE layer within seconds, one line naming the layer, the rank and the
    imbalance, exit code 1, the checkpoint of step 1 kept."""
    plugin = tmp_path / "hot_ep.py"
    plugin.write_text(HOT_ROUTER_PLUGIN)
    run = tmp_path / "run"
    started = time.monotonic()
    result = run_moectl(
        "train", "--strategy", str(plugin), "--ep-size", "2", "--run-dir", str(run), *NUMERICS_ARGS,
        "--checkpoint-every", "1", "--set", "parallel.ep_max_rows_factor=1.5", "--set", "parallel.timeout_s=60",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert time.monotonic() - started < 55  # far below the collective timeout: nobody waited for it
    # The last line is moectl's (above it: rank 0's own stderr, tee'd, and the elastic agent's note).
    line = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert line.startswith("error: expert-parallel overload in layer 0: EP rank 0 (rank 0)"), line
    assert "2.00× its balanced share" in line and "ep_max_rows_factor=1.5" in line, line
    assert f"last complete checkpoint: step 1; continue with: moectl train --resume {run}" in line, line
    assert (run / "checkpoints" / "step_000001" / "COMPLETE").is_file()
    assert len(losses(run)) == 1


@pytest.mark.parametrize(
    "setting, words",
    [("parallel.ep_chunks=0", "parallel.ep_chunks must be positive"),
     ("parallel.ep_max_rows_factor=0", "parallel.ep_max_rows_factor must be positive")],
)  # fmt: skip
def test_bad_ep_settings_exit_2_with_one_line(tmp_path, setting, words):
    result = run_moectl_in_process(
        "train", "--strategy", "ep", "--set", setting, "--run-dir", str(tmp_path / "run")
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert not (tmp_path / "run").exists()
