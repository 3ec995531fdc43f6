"""How much a training setting magnifies rounding: `single` with micro-batch 4 against micro-batch 1.

Both runs compute the same gradient in exact arithmetic; only the order of the additions differs, as it
does between strategies. A stable setting keeps the relative weight error near float32's 1e-7 for any
number of steps; a chaotic one grows it step after step until the 1e-5 check fails. BENCHMARKS.md, "The
tiny preset", holds what this printed for the candidate learning rates and momenta.

    python bench/tiny_rounding.py --lr 0.03 --momentum 0.9 --marks 10,40,100,200
"""

from __future__ import annotations

import argparse
import time

import torch

from moectl.config import build_config
from moectl.data.sources import build_data
from moectl.model.build import build_meta_model, materialize, random_init_source
from moectl.registry import build_strategy
from moectl.run.loop import build_optimizer, train_step


def train(cfg, micro_batch: int, marks: list[int]) -> tuple[dict[int, dict[str, torch.Tensor]], list[float]]:
    strategy = build_strategy(cfg, 1)
    train_cfg = cfg.train
    model = build_meta_model(cfg.model, torch.float32)
    source = random_init_source(cfg.model, train_cfg.seed)
    model = strategy.parallelize(
        model, lambda m: materialize(m, torch.device("cpu"), source, strategy.shard), train_cfg
    )
    optimizer = build_optimizer(model, train_cfg)
    data = build_data(cfg.data, cfg.model.vocab_size, train_cfg.seed)
    tokens = train_cfg.global_batch * train_cfg.seq_len
    snapshots, losses = {}, []
    for step in range(max(marks)):
        batch = data.global_batch(step, train_cfg.global_batch, train_cfg.seq_len)
        losses.append(train_step(model, strategy, batch.split(micro_batch), tokens).item() / tokens)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step + 1 in marks:
            snapshots[step + 1] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return snapshots, losses


def relative_errors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(‖a − b‖₂ / ‖b‖₂ over all tensors, the largest per-tensor relative error)."""
    num = sum((a[k].double() - b[k].double()).pow(2).sum() for k in b)
    den = sum(b[k].double().pow(2).sum() for k in b)
    worst = max(((a[k].double() - b[k].double()).norm() / b[k].double().norm()).item() for k in b)
    return float((num / den).sqrt()), worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--momentum", type=float, required=True)
    parser.add_argument("--marks", default="10,40,100,200", help="steps at which the weights are compared")
    parser.add_argument("--config", default="tiny")
    args = parser.parse_args()
    torch.set_num_threads(1)  # on a shared 2-core machine, spinning threads only slow it down
    marks = [int(mark) for mark in args.marks.split(",")]
    cfg = build_config(args.config, {"train": {"lr": args.lr, "momentum": args.momentum}})
    started = time.perf_counter()
    reference, losses = train(cfg, 4, marks)
    other, other_losses = train(cfg, 1, marks)
    print(
        f"lr {args.lr} momentum {args.momentum}: loss at "
        + ", ".join(f"{m}: {losses[m - 1]:.3f}" for m in marks)
    )
    for mark in marks:
        whole, worst = relative_errors(other[mark], reference[mark])
        loss_diff = max(abs(x - y) for x, y in zip(losses[:mark], other_losses[:mark], strict=True))
        print(
            f"  after {mark:4d} steps: rel err {whole:.1e}, worst tensor {worst:.1e}, max loss diff {loss_diff:.1e}"
        )
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
