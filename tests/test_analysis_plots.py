"""analysis.plots: every figure has its axes labelled and draws the data it was given."""
from __future__ import annotations

import numpy as np
import pytest

from analysis import plots as P
from analysis.runs import load_sweep
from test_analysis import MODULES, TYPES, _final_ranks, make_sweep  # the shared synthetic sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return load_sweep(make_sweep(tmp_path_factory.mktemp("plots") / "demo"))


def _labelled(ax):
    return ax.get_xlabel() and ax.get_ylabel() and ax.get_title()


def test_heatmap_cells_equal_final_ranks(sweep):
    fig = P.rank_heatmap(sweep, "0")
    ax = fig.axes[0]
    grid = np.asarray(ax.images[0].get_array())
    final = _final_ranks(0)
    expected = np.array([[final[f"encoder.layer.{i}.{t}"] for t in TYPES] for i in range(3)])
    assert np.array_equal(grid, expected)
    texts = [int(t.get_text()) for t in ax.texts]
    assert texts == expected.ravel().tolist()  # the rank is written in each cell
    assert [t.get_text() for t in ax.get_xticklabels()] == ["q", "k", "v", "o", "ffn-in", "ffn-out"]
    assert _labelled(ax) and "AdaLoRA" in ax.get_title()
    assert fig.axes[1].get_ylabel().startswith("final rank")  # the colour bar


def test_side_by_side_heatmaps_share_one_colour_scale(sweep):
    fig = P.rank_heatmaps(sweep, ["0", "1", "2"])
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 3 and len({im.get_clim() for im in images}) == 1


def test_timeline_draws_scheduled_and_realised_budget(sweep):
    fig = P.rank_timeline(sweep, "0")
    top, bottom = fig.axes[:2]
    labels = [line.get_label() for line in top.get_lines()]
    assert any("scheduled" in s for s in labels) and any("realised" in s for s in labels)
    realised = next(line for line in top.get_lines() if "realised" in line.get_label())
    alloc = sweep.allocations[sweep.allocations["run"] == "0"]
    assert list(realised.get_ydata()[:-1]) == list(alloc["realised"])
    assert top.get_ylabel() and bottom.get_xlabel() == "optimizer step" and bottom.get_ylabel()
    assert len(bottom.get_lines()) >= len(MODULES)  # one line per module (+ type means)


def test_allocation_summary_bars_sum_to_the_final_budget(sweep):
    fig = P.allocation_summary(sweep, "0")
    left, right = fig.axes[:2]
    assert sum(p.get_height() for p in left.patches) == pytest.approx(sum(_final_ranks(0).values()))
    assert _labelled(left) and _labelled(right)


def test_spectra_and_importance_panels(sweep):
    fig = P.spectra(sweep, "0")
    left, right = fig.axes[:2]
    assert len(left.get_lines()) == len(MODULES) and _labelled(left) and _labelled(right)
    assert any("kept" in t for t in right.get_legend_handles_labels()[1])
    with pytest.raises(ValueError, match="no SVD adapters"):
        P.spectra(sweep, "2")


def test_metric_vs_params_has_one_line_per_method_in_fixed_colours(sweep):
    fig = P.metric_vs_params(sweep, "accuracy", "test")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "log scale" in ax.get_xlabel() and _labelled(ax)
    labels = ax.get_legend_handles_labels()[1]
    assert any(s.startswith("AdaLoRA (avg r=4; n=2") for s in labels) and any(s.startswith("LoRA (r=4") for s in labels)
    colours = {line.get_color() for line in ax.get_lines()}
    assert {P.METHOD_COLOURS["adalora"], P.METHOD_COLOURS["lora"]} <= colours


def test_learning_curves_three_labelled_panels(sweep):
    fig = P.learning_curves(sweep, "accuracy")
    assert len(fig.axes) == 3 and all(_labelled(ax) for ax in fig.axes)
    assert any("AdaLoRA" in s for s in fig.axes[2].get_legend_handles_labels()[1])


def test_save_writes_png_and_pdf(sweep, tmp_path):
    paths = P.save(P.rank_heatmap(sweep, "1"), tmp_path / "sub" / "heat")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in paths)
