"""The plots a run leaves in its directory: loss.png (loss and learning rate over the steps) and
expert_load.png (each layer's share of token copies per expert over the whole run).

matplotlib is an optional extra (`pip install 'moectl[plot]'`); without it the plots are skipped with
one line, never an error.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moectl.io.outputs import save_figure_atomic

PLOTS_SKIPPED = (
    "loss.png and expert_load.png skipped: matplotlib is not installed; pip install 'moectl[plot]'"
)


def matplotlib_available() -> bool:
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return False
    return True


#: up to this many steps, each step's value is drawn as a marker too (a line of one point is invisible)
MARKER_STEPS = 60


def write_loss_plot(
    path: Path,
    steps: list[int],
    losses: list[float],
    lrs: list[float | None],
    val_losses: list[float | None] | None = None,
) -> None:
    save_figure_atomic(loss_figure(steps, losses, lrs, val_losses), path)


def loss_figure(
    steps: list[int],
    losses: list[float],
    lrs: list[float | None],
    val_losses: list[float | None] | None = None,
):
    """Loss (left axis), validation loss where evaluated, and learning rate (right axis) over the steps,
    numbered from 1 as in metrics.jsonl."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 4.5), layout="constrained")
    loss_axes = figure.subplots()
    marker = "o" if len(steps) <= MARKER_STEPS else None
    loss_axes.plot(steps, losses, color="tab:blue", marker=marker, markersize=3, label="loss")
    evaluated = [
        (step, value) for step, value in zip(steps, val_losses or [], strict=False) if value is not None
    ]
    if evaluated:
        loss_axes.plot(*zip(*evaluated, strict=True), color="tab:green", marker="o", label="validation loss")
        loss_axes.legend(loc="upper right")
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("loss", color="tab:blue")
    loss_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(steps) == 1:  # matplotlib would zoom to a width of 0.1 around the one point
        loss_axes.set_xlim(steps[0] - 1, steps[0] + 1)
    with_lr = [(step, lr) for step, lr in zip(steps, lrs, strict=True) if lr is not None]
    if with_lr:
        lr_axes = loss_axes.twinx()
        lr_axes.plot(
            *zip(*with_lr, strict=True), color="tab:orange", linestyle="--", marker=marker, markersize=3,
            label="learning rate",
        )  # fmt: skip
        lr_axes.set_ylabel("learning rate", color="tab:orange")
        lr_axes.set_ylim(bottom=0)
    loss_axes.set_title("training loss and learning rate" + (", validation loss" if evaluated else ""))
    return figure


def write_expert_load_plot(path: Path, load: torch.Tensor) -> None:
    save_figure_atomic(expert_load_figure(load), path)


def expert_load_figure(load: torch.Tensor):
    """A heatmap of load[layer, expert] / load[layer].sum(): 1 / num_experts everywhere is balance.
    Layers and experts are numbered from 0, as in the model's tensor names (model.layers.N, experts.N)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    share = (load.double() / load.double().sum(-1, keepdim=True).clamp_min(1)).numpy()
    num_layers, num_experts = share.shape
    # At least 4 inches tall, so that the colour bar has room for its label with one layer.
    figure = Figure(
        figsize=(min(16, 5 + num_experts * 0.12), min(12, max(4, 2 + num_layers * 0.25))),
        layout="constrained",
    )
    axes = figure.subplots()
    image = axes.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    figure.colorbar(image, ax=axes, label="share of the layer's token copies")
    for axis in (axes.xaxis, axes.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    mean = load.double().mean(-1).clamp_min(1e-12)
    worst = (load.double().amax(-1) / mean).max().item()
    axes.set_title(
        f"expert load over the run: balance is {1 / num_experts:.4f} everywhere\n"
        f"busiest expert / mean, worst layer: {worst:.2f}"
    )
    return figure
