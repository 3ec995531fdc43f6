"""Unit tests of the expert-parallel dispatch (moectl/moe_dispatch.py), in-process and against dense references."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moectl.parallel.ep_dispatch import (
    FP8_GROUP_ALIGNMENT,
    align_groups,
    grouped_linear,
    grouped_mm_kernel,
    pair_index,
)
from tests.ep_blocks import ep_block_over, gloo_ranks, tiny_hf_block


def test_grouped_linear_fallback_equals_per_row_reference():
    generator = torch.Generator().manual_seed(0)
    rows_per_group = [3, 0, 5, 1]
    x = torch.randn(sum(rows_per_group), 8, generator=generator)
    weight = torch.randn(len(rows_per_group), 6, 8, generator=generator)
    group_of_row = torch.repeat_interleave(torch.arange(4), torch.tensor(rows_per_group))
    reference = torch.stack([weight[g] @ x[r] for r, g in enumerate(group_of_row)])
    offsets = torch.cumsum(torch.tensor(rows_per_group), 0, dtype=torch.int32)
    torch.testing.assert_close(grouped_linear(x, weight, rows_per_group, offsets), reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_kernel_call_equals_fallback_forward_and_backward(dtype):
    """The exact call the CUDA path makes (layout, int32 cumulative offsets, an empty group), run by
    torch's CPU grouped GEMM, against the per-expert loop: outputs and gradients."""
    generator = torch.Generator().manual_seed(1)
    rows_per_group = [3, 0, 5, 2]
    offsets = torch.cumsum(torch.tensor(rows_per_group), 0, dtype=torch.int32)
    x = torch.randn(sum(rows_per_group), 16, generator=generator).to(dtype)
    weight = torch.randn(len(rows_per_group), 24, 16, generator=generator).to(dtype)
    x_kernel, w_kernel = x.clone().requires_grad_(), weight.clone().requires_grad_()
    x_loop, w_loop = x.clone().requires_grad_(), weight.clone().requires_grad_()
    try:
        out_kernel = grouped_mm_kernel(x_kernel, w_kernel, offsets)
    except (NotImplementedError, RuntimeError) as exc:  # no CPU kernel in this torch build
        pytest.skip(f"torch grouped_mm unavailable on the CPU: {exc}")
    out_loop = grouped_linear(x_loop, w_loop, rows_per_group, offsets=None)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out_kernel, out_loop, **tolerance)
    upstream = torch.randn(out_loop.shape, generator=generator).to(dtype)
    (out_kernel * upstream).sum().backward()
    (out_loop * upstream).sum().backward()
    torch.testing.assert_close(x_kernel.grad, x_loop.grad, **tolerance)
    torch.testing.assert_close(w_kernel.grad, w_loop.grad, **tolerance)
    assert torch.count_nonzero(w_kernel.grad[1]) == 0  # the empty group gets a zero gradient


def test_aligned_groups_start_at_multiples_and_keep_every_pair():
    """FP8's padded layout: each expert's pairs in the same order, starting at a multiple of 16 rows, zero
    rows (row R, choice R·k) between groups, every slot pointing at its pair's new place."""
    generator = torch.Generator().manual_seed(3)
    num_experts, num_rows, top_k = 5, 23, 3
    ids = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(num_rows)])
    ids[ids == 3] = -1  # choices living on another rank; expert 3 gets no pair
    num_pairs = int((ids >= 0).sum())
    index = pair_index(ids, num_experts, num_pairs)
    counts = torch.bincount(ids[ids >= 0], minlength=num_experts)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    padded, ends = align_groups(index, offsets, FP8_GROUP_ALIGNMENT)

    assert ends.dtype == torch.int32 and int(ends[-1]) == padded.pair_row.numel()
    assert padded.pair_row.numel() % FP8_GROUP_ALIGNMENT == 0
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    assert bool((starts % FP8_GROUP_ALIGNMENT == 0).all())
    old_starts = torch.cat([offsets.new_zeros(1), offsets[:-1]])
    for expert in range(num_experts):
        count, start, old_start = int(counts[expert]), int(starts[expert]), int(old_starts[expert])
        assert int(ends[expert]) - start >= count
        kept = slice(old_start, old_start + count)
        assert torch.equal(padded.pair_row[start : start + count], index.pair_row[kept])
        assert torch.equal(padded.pair_choice[start : start + count], index.pair_choice[kept])
    is_gap = padded.pair_row == num_rows
    assert int((~is_gap).sum()) == num_pairs
    assert bool((padded.pair_choice[is_gap] == num_rows * top_k).all())
    present = ids >= 0
    assert torch.equal(padded.pair_choice[padded.slots[present]], index.pair_choice[index.slots[present]])
    assert bool((padded.slots[~present] == padded.pair_row.numel()).all())


@pytest.mark.parametrize("group_alignment", [1, FP8_GROUP_ALIGNMENT])
def test_single_rank_block_equals_transformers_block_forward_and_backward(group_alignment):
    """The EP block on one rank, its expert groups as they are and padded to FP8's alignment (zero rows
    between groups), against transformers' block: output and every gradient."""
    cfg, hf_block = tiny_hf_block()
    ep_block = ep_block_over(hf_block)
    ep_block.group_alignment = group_alignment
    x = torch.randn(3, 10, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_ep = hf_block(x_ref), ep_block(x_ep)
    torch.testing.assert_close(out_ep, out_ref, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(out_ref)
    (out_ref * upstream).sum().backward()
    (out_ep * upstream).sum().backward()
    torch.testing.assert_close(x_ep.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ep_block.gate.weight.grad, hf_block.gate.weight.grad, rtol=1e-5, atol=1e-6)
    for name in ("gate_up_proj", "down_proj"):
        got, want = getattr(ep_block.experts, name).grad, getattr(hf_block.experts, name).grad
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _two_rank_worker(rank: int, world: int, init_file: str) -> None:
    with gloo_ranks(init_file, rank, world):
        torch.set_num_threads(1)
        cfg, hf_block = tiny_hf_block()
        # Bias the router so that every row goes to rank 0's experts: rank 1 receives zero rows.
        with torch.no_grad():
            hf_block.gate.weight[cfg.num_experts // world :] -= 10.0 * hf_block.gate.weight[0].sign()
        generator = torch.Generator().manual_seed(10 + rank)  # every rank holds different tokens
        x = torch.randn(2, 7 + rank, cfg.hidden_size, generator=generator)
        x = x.abs() * hf_block.gate.weight[0].detach().sign()  # aligned with the bias above
        x_ref = x.clone().requires_grad_()
        out_ref = hf_block(x_ref)
        upstream = torch.randn(out_ref.shape, generator=generator)
        (out_ref * upstream).sum().backward()
        local = cfg.num_experts // world
        summed = {}
        for name in ("gate_up_proj", "down_proj"):
            # Expert gradients already hold every rank's tokens (the all-to-all backward brought them).
            summed[name] = getattr(hf_block.experts, name).grad.clone()
            dist.all_reduce(summed[name])
        for group_alignment in (1, FP8_GROUP_ALIGNMENT):  # as they are, and padded as FP8 needs them
            ep_block = ep_block_over(hf_block, dist.group.WORLD, world, rank)
            ep_block.group_alignment = group_alignment
            x_ep = x.clone().requires_grad_()
            out_ep = ep_block(x_ep)
            torch.testing.assert_close(out_ep, out_ref, rtol=1e-5, atol=1e-6)
            (out_ep * upstream).sum().backward()
            torch.testing.assert_close(x_ep.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(
                ep_block.gate.weight.grad, hf_block.gate.weight.grad, rtol=1e-5, atol=1e-6
            )
            for name, want in summed.items():
                got = getattr(ep_block.experts, name).grad
                torch.testing.assert_close(got, want[rank * local : (rank + 1) * local], rtol=1e-5, atol=1e-6)
                if rank == 1:
                    assert torch.count_nonzero(got) == 0  # no rows here: zero (not missing) gradients


def test_two_rank_dispatch_with_an_idle_rank_equals_dense_reference(tmp_path):
    """Forward and backward of the EP block over 2 gloo ranks, one receiving no rows at all."""
    mp.spawn(_two_rank_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
