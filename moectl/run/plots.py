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


def write_loss_plot(
    path: Path,
    steps: list[int],
    losses: list[float],
    lrs: list[float | None],
    val_losses: list[float | None] | None = None,
) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), layout="constrained")
    loss_axes = figure.subplots()
    shown = [step + 1 for step in steps]
    loss_axes.plot(shown, losses, color="tab:blue", label="loss")
    evaluated = [
        (step, value) for step, value in zip(shown, val_losses or [], strict=False) if value is not None
    ]
    if evaluated:
        loss_axes.plot(*zip(*evaluated, strict=True), color="tab:green", marker="o", label="validation loss")
        loss_axes.legend(loc="upper right")
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("loss", color="tab:blue")
    loss_axes.xaxis.get_major_locator().set_params(integer=True)
    with_lr = [(step, lr) for step, lr in zip(shown, lrs, strict=True) if lr is not None]
    if with_lr:
        lr_axes = loss_axes.twinx()
        lr_axes.plot(*zip(*with_lr, strict=True), color="tab:orange", linestyle="--", label="learning rate")
        lr_axes.set_ylabel("learning rate", color="tab:orange")
        lr_axes.set_ylim(bottom=0)
    loss_axes.set_title("training loss and learning rate" + (", validation loss" if evaluated else ""))
    save_figure_atomic(figure, path)


def write_expert_load_plot(path: Path, load: torch.Tensor) -> None:
    """A heatmap of load[layer, expert] / load[layer].sum(): 1 / num_experts everywhere is balance."""
    from matplotlib.figure import Figure

    share = (load.double() / load.double().sum(-1, keepdim=True).clamp_min(1)).numpy()
    num_layers, num_experts = share.shape
    figure = Figure(
        figsize=(min(16, 4 + num_experts * 0.12), min(12, 2 + num_layers * 0.25)), layout="constrained"
    )
    axes = figure.subplots()
    image = axes.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    figure.colorbar(
        image, ax=axes, label=f"share of the layer's token copies (balance: {1 / num_experts:.4f})"
    )
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    mean = load.double().mean(-1).clamp_min(1e-12)
    worst = (load.double().amax(-1) / mean).max().item()
    axes.set_title(f"expert load over the run (max/mean, worst layer: {worst:.2f})")
    save_figure_atomic(figure, path)
