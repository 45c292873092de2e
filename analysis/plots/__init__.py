"""Figures from loaded run data (analysis.runs). Every function returns a matplotlib Figure;
`save(fig, stem)` writes stem.png and stem.pdf. One module per figure family:

    heatmap     rank_heatmap, rank_heatmaps        final rank, layers x matrix type
    timeline    rank_timeline                      budget scheduled vs realised, rank per module
    allocation  allocation_summary                 rank per layer (stacked) and per matrix type
    spectrum    spectra                            learned λ per module, importance scores
    comparison  metric_vs_params, learning_curves  methods across budgets and seeds
"""
from analysis.plots.allocation import allocation_summary
from analysis.plots.comparison import learning_curves, metric_vs_params
from analysis.plots.heatmap import rank_grid, rank_heatmap, rank_heatmaps
from analysis.plots.spectrum import spectra
from analysis.plots.style import METHOD_COLOURS, TYPE_COLOURS, method_colour, save, type_colour
from analysis.plots.timeline import rank_timeline

__all__ = ["rank_heatmap", "rank_heatmaps", "rank_grid", "rank_timeline", "allocation_summary", "spectra",
           "metric_vs_params", "learning_curves", "save", "METHOD_COLOURS", "TYPE_COLOURS",
           "method_colour", "type_colour"]
