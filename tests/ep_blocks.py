"""The tiny preset's MoE block from transformers, and the EP block built over copies of its weights: what
the dispatch tests compare, on one process and on gloo ranks (`gloo_ranks`)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.distributed as dist

from moectl.config import build_config
from moectl.model.build import build_meta_model, materialize, random_init_source
from moectl.parallel.ep_dispatch import ExpertParallelMoE, GroupedExperts
from moectl.run.runtime import exit_without_finalization


def tiny_model(seed: int = 0):
    """(model config, transformers' Qwen3-MoE model) of the tiny preset in fp32 on the CPU, initialised
    from `seed`."""
    cfg = build_config("tiny").model
    model = build_meta_model(cfg, torch.float32)
    materialize(model, torch.device("cpu"), random_init_source(cfg, seed))
    return cfg, model


def tiny_hf_block(seed: int = 0):
    """(model config, transformers' Qwen3-MoE block of layer 0) of the tiny preset, initialised from `seed`."""
    cfg, model = tiny_model(seed)
    return cfg, model.model.layers[0].mlp


def ep_block_over(
    hf_block, ep_group=None, ep_size: int = 1, ep_rank: int = 0, **options
) -> ExpertParallelMoE:
    """The EP block over copies of the HF block's weights, keeping expert slice `ep_rank` of `ep_size`;
    `options` go to ExpertParallelMoE (chunks, stats, load limit, layer index)."""
    local = hf_block.experts.num_experts // ep_size
    mine = slice(ep_rank * local, (ep_rank + 1) * local)
    experts = GroupedExperts(
        torch.nn.Parameter(hf_block.experts.gate_up_proj.detach()[mine].clone()),
        torch.nn.Parameter(hf_block.experts.down_proj.detach()[mine].clone()),
        hf_block.experts.act_fn,
    )
    return ExpertParallelMoE(
        copy.deepcopy(hf_block.gate), experts, hf_block.experts.num_experts, ep_group, ep_size, **options
    )


@contextlib.contextmanager
def gloo_ranks(init_file: str, rank: int, world: int) -> Iterator[None]:
    """This process as rank `rank` of a gloo group of `world` ranks (torch.multiprocessing.spawn), its
    rendezvous a file store. After a body that ran through, the process leaves at once: code after the
    `with` block does not run. After an error the group is destroyed and the error goes up to spawn,
    which stops the other ranks.

    Why, on the way out of a body that ran through:
    - every rank first waits on the file store until all ranks are done, so no rank closes its gloo
      connections while a peer may still be finishing the last collective (the store, not gloo, so no
      gloo message is in flight then);
    - then the group is destroyed and the process exits without interpreter finalization, as a worker
      of an outside torchrun does (`moectl.run.runtime.exit_without_finalization`): anything still
      holding the group (the EP blocks, kept by an expected exception's traceback) would destroy it
      during finalization, where gloo's worker thread can no longer take the GIL and the process
      aborts ("terminate called without an active exception").
    """
    store = dist.FileStore(init_file, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        yield
        store.set(f"done/{rank}", "1")
        store.wait([f"done/{peer}" for peer in range(world)])
    finally:
        dist.destroy_process_group()
    exit_without_finalization(0)
