"""analysis.plots: every figure has its axes labelled and draws the data it was given."""
from __future__ import annotations

import json

import numpy as np
import pytest

from analysis import plots as P
from analysis.runs import load_sweep
from test_analysis import MODULES, TYPES, _final_ranks, _write_job, make_sweep  # the shared synthetic sweep


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


PRICE = 64 + 64 + 1   # parameters per kept singular value of a 64x64 adapter: d_in + d_out + 1


def _params_run(d, params_kept=True, shapes=True):
    """An ElaLoRA run under schedule.budget_unit=params: its schedule and each record's target
    count parameters, while Σ ranks counts singular values."""
    _write_job(d, "adalora", 0, "completed")
    summary = json.loads((d / "summary.json").read_text())
    summary["method"] = "elalora"
    sched = summary["schedule"]
    for key in ("initial_budget", "target_budget"):
        sched[key] *= PRICE
    if not shapes:
        del summary["module_shapes"]
    (d / "summary.json").write_text(json.dumps(summary))
    records = [json.loads(line) for line in (d / "ranks.jsonl").read_text().splitlines()]
    for r in records:
        r.update(unit="params", target=r["budget"] * PRICE, params_kept=sum(r["ranks"].values()) * PRICE)
        if not params_kept:
            del r["params_kept"]
    (d / "ranks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_sweep(d)


def _line(ax, word):
    return next(line for line in ax.get_lines() if word in line.get_label())


@pytest.mark.parametrize("params_kept", [True, False])
def test_timeline_in_parameters_plots_schedule_and_realised_budget_in_parameters(tmp_path, params_kept):
    """Without params_kept the realised parameters come from Σ rank × (d_in + d_out + 1)."""
    sweep = _params_run(tmp_path / "ela", params_kept=params_kept)
    assert sweep.budget_unit("ela") == "params"
    fig = P.rank_timeline(sweep, "ela")
    top = fig.axes[0]
    sched = sweep.schedule("ela")
    scheduled = _line(top, "scheduled").get_ydata()
    assert scheduled[0] == sched["initial_budget"] and scheduled[-1] == sched["target_budget"]
    alloc = sweep.allocations[sweep.allocations["run"] == "ela"]
    assert list(_line(top, "realised").get_ydata()[:-1]) == list(alloc["realised"] * PRICE)
    assert list(_line(top, "mask step").get_ydata()) == list(alloc["budget"] * PRICE)
    assert "parameters" in top.get_ylabel() and len(fig.axes) == 2   # one unit, one axis


def test_timeline_in_parameters_without_module_shapes_gives_the_schedule_its_own_axis(tmp_path):
    sweep = _params_run(tmp_path / "ela", params_kept=False, shapes=False)
    fig = P.rank_timeline(sweep, "ela")
    top, twin = fig.axes[0], fig.axes[-1]
    alloc = sweep.allocations[sweep.allocations["run"] == "ela"]
    assert list(_line(top, "realised").get_ydata()[:-1]) == list(alloc["realised"])
    assert top.get_ylabel().startswith("singular values")
    assert _line(twin, "scheduled").get_ydata()[0] == sweep.schedule("ela")["initial_budget"]
    assert "parameters" in twin.get_ylabel() and not [x for x in top.get_lines() if "scheduled" in x.get_label()]


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
