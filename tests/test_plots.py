"""Figures: what a reader needs to read them (here: the heatmap's labels on dark cells)."""

import numpy as np

from melanoma_tf import plots


def test_heatmap_labels_are_white_on_dark_cells_and_black_on_light_ones(tmp_path, monkeypatch):
    figures = []
    real_save = plots.save
    monkeypatch.setattr(plots, "save", lambda fig, path: (figures.append(fig), real_save(fig, path))[1])
    values = np.array([[-0.05, 0.001], [np.nan, 0.05]])  # diverging around 0: both ends are dark
    name = plots.heatmap_plot(tmp_path / "h.png", values, ["a", "b"], [1, 2], [["low", "mid"], ["", "high"]],
                              "x", "y", "t", centre=0.0)
    assert name == "h.png" and (tmp_path / "h.png").stat().st_size > 1000
    colours = {t.get_text(): t.get_color() for t in figures[0].axes[0].texts}
    assert colours == {"low": "white", "mid": "black", "": "black", "high": "white"}
