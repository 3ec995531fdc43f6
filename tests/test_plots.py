"""The plots a run writes, drawn at the sizes runs have (1, 2 and 48 layers; 1 to 3,000 steps): whole
numbers on the step, layer and expert axes, and every label inside the picture."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("matplotlib")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402

from moectl.run.plots import MARKER_STEPS, expert_load_figure, loss_figure  # noqa: E402


def _drawn(figure):
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return canvas.get_renderer()


def _visible_ticks(axis, limits: tuple[float, float]) -> list[float]:
    low, high = sorted(limits)
    return [tick for tick in axis.get_majorticklocs() if low - 1e-9 <= tick <= high + 1e-9]


def _texts_inside(figure, renderer) -> list[str]:
    """The labels and titles of every axes that reach outside the figure."""
    box = figure.bbox
    outside = []
    for axes in figure.axes:
        for text in (axes.title, axes.xaxis.label, axes.yaxis.label):
            if not text.get_text():
                continue
            extent = text.get_window_extent(renderer)
            if (
                extent.x0 < box.x0 - 1
                or extent.x1 > box.x1 + 1
                or extent.y0 < box.y0 - 1
                or extent.y1 > box.y1 + 1
            ):
                outside.append(text.get_text())
    return outside


@pytest.mark.parametrize("layers, experts", [(1, 8), (2, 8), (48, 128)])
def test_expert_load_plot_has_whole_layer_and_expert_ticks_and_room_for_its_labels(layers, experts):
    load = torch.randint(50, 200, (layers, experts), generator=torch.Generator().manual_seed(0))
    figure = expert_load_figure(load)
    renderer = _drawn(figure)
    heatmap, colour_bar = figure.axes
    for axis, limits, count in (
        (heatmap.yaxis, heatmap.get_ylim(), layers),
        (heatmap.xaxis, heatmap.get_xlim(), experts),
    ):
        ticks = _visible_ticks(axis, limits)
        assert ticks and all(tick == int(tick) and 0 <= tick < count for tick in ticks), ticks
    assert colour_bar.yaxis.label.get_text() == "share of the layer's token copies"
    assert _texts_inside(figure, renderer) == []


@pytest.mark.parametrize("steps", [1, 2, 40, 3000])
def test_loss_plot_counts_steps_from_1_in_whole_numbers(steps):
    numbers = list(range(1, steps + 1))
    figure = loss_figure(numbers, [5.0 / (1 + 0.01 * s) for s in numbers], [0.03] * steps)
    renderer = _drawn(figure)
    loss_axes = figure.axes[0]
    ticks = _visible_ticks(loss_axes.xaxis, loss_axes.get_xlim())
    assert ticks and all(tick == int(tick) for tick in ticks), ticks
    low, high = loss_axes.get_xlim()
    assert low < 1 and high > steps  # every step is in view, the single step of a 1-step run too
    line = loss_axes.get_lines()[0]
    assert list(line.get_xdata()) == numbers
    assert (line.get_marker() not in ("None", None, "")) == (steps <= MARKER_STEPS)  # one point shows
    assert _texts_inside(figure, renderer) == []
