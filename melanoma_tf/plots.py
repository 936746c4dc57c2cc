"""Report figures (matplotlib, Agg backend, written atomically as PNG)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from melanoma_tf import metrics as M  # noqa: E402
from melanoma_tf.files import write_atomic  # noqa: E402


def save(fig, path: Path) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
    return path.name


def roc_plot(path: Path, curves: dict, operating_points: dict | None = None) -> str:
    """ROC curves of one or several models: ``{name: (y, p)}``."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (y, p) in curves.items():
        fpr, tpr, _ = skm.roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{name} (AUC {skm.roc_auc_score(y, p):.3f})")
    for name, (fpr, tpr) in (operating_points or {}).items():
        ax.plot([fpr], [tpr], "o", label=name)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    ax.legend(fontsize=7, loc="lower right")
    return save(fig, path)


def binary_figures(out_dir: Path, y, p, p_cal, threshold: float, calibration: str = "temperature-scaled") -> dict:
    """ROC, PR, reliability (before/after calibration, named by ``calibration``), threshold sweep and confusion."""
    out_dir = Path(out_dir)
    y = np.asarray(y)
    rates = M.rates_at(y, p, threshold)
    figures = {"roc": roc_plot(out_dir / "roc.png", {"model": (y, p)},
                               {"operating point": (1 - rates["specificity"], rates["sensitivity"])})}

    fig, ax = plt.subplots(figsize=(5, 5))
    precision, recall, _ = skm.precision_recall_curve(y, p)
    ax.step(recall, precision, where="post", label=f"AP {skm.average_precision_score(y, p):.3f}")
    ax.axhline(y.mean(), ls=":", color="grey", label=f"prevalence {y.mean():.3f}")
    ax.plot([rates["sensitivity"]], [rates["ppv"]], "o", label="operating point")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall", ylim=(0, 1.02))
    ax.legend(fontsize=7)
    figures["pr"] = save(fig, out_dir / "pr.png")

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, probs in (("raw", p), (calibration, p_cal)):
        bins = M.reliability_bins(y, probs)
        ax.plot([b["mean_prob"] for b in bins], [b["observed"] for b in bins], "o-",
                label=f"{name} (ECE {M.ece(y, probs):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="mean predicted probability", ylabel="observed melanoma rate", title="Reliability (equal-mass bins)")
    ax.legend(fontsize=7)
    figures["reliability"] = save(fig, out_dir / "reliability.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    grid = np.linspace(0, 1, 201)
    sweep = [M.rates_at(y, p, t) for t in grid]
    ax.plot(grid, [s["sensitivity"] for s in sweep], label="sensitivity")
    ax.plot(grid, [s["specificity"] for s in sweep], label="specificity")
    ax.axvline(threshold, ls="--", color="k", label=f"threshold {threshold:.3f} (from validation)")
    ax.set(xlabel="threshold on melanoma probability", ylabel="rate", title="Threshold sweep")
    ax.legend(fontsize=7)
    figures["threshold_sweep"] = save(fig, out_dir / "threshold_sweep.png")

    c = M.confusion_at(y, p, threshold)
    figures["confusion"] = confusion_matrix_plot(out_dir / "confusion.png",
                                                 np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]]),
                                                 ["not melanoma", "melanoma"])
    return figures


def confusion_matrix_plot(path: Path, matrix: np.ndarray, names: list[str]) -> str:
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(names), 1 + 0.6 * len(names)))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", color="black" if v < matrix.max() / 2 else "white")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="true")
    return save(fig, path)


def scatter_plot(path: Path, xs, ys, labels, xlabel: str, title: str, log_x: bool = True) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(xs, ys)
    for x, y, label in zip(xs, ys, labels):
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if log_x and all(x > 0 for x in xs):
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel="ROC-AUC", title=title)
    return save(fig, path)


def history_plot(path: Path, history: list[dict]) -> str:
    """Training loss and validation ROC-AUC per epoch."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = [row["epoch"] for row in history]
    for key in ("loss", "student_loss", "kd_loss", "val_loss"):
        if all(key in row for row in history):
            left.plot(epochs, [row[key] for row in history], "o-", label=key)
    left.set(xlabel="epoch", title="losses")
    left.legend(fontsize=7)
    for key in ("val_roc_auc", "val_pr_auc"):
        if all(key in row for row in history):
            right.plot(epochs, [row[key] for row in history], "o-", label=key)
    right.set(xlabel="epoch", title="validation", ylim=(0, 1))
    right.legend(fontsize=7)
    return save(fig, path)


def relation_matrix_plot(path: Path, similarity: np.ndarray, labels: np.ndarray, names: list[str],
                         title: str) -> str:
    """Heat map of a sample-by-sample similarity matrix, samples grouped by class (class blocks outlined)."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    image = ax.imshow(similarity, cmap="viridis", vmin=-1 if similarity.min() < 0 else 0, vmax=1)
    edges = np.flatnonzero(np.diff(labels)) + 0.5
    for edge in edges:
        ax.axhline(edge, color="white", linewidth=0.8)
        ax.axvline(edge, color="white", linewidth=0.8)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(labels)) + 1])
    ends = np.concatenate([starts[1:], [len(labels)]])
    centres = (starts + ends - 1) / 2
    ax.set_xticks(centres, [names[int(labels[s])] for s in starts], rotation=90, fontsize=7)
    ax.set_yticks(centres, [names[int(labels[s])] for s in starts], fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    return save(fig, path)


def heatmap_plot(path: Path, values: np.ndarray, rows: list, columns: list, labels: list[list[str]],
                 xlabel: str, ylabel: str, title: str, centre: float | None = None) -> str:
    """A grid of values (NaN: not measured) with a text label in every cell; diverging colours around ``centre``."""
    fig, ax = plt.subplots(figsize=(1.3 * len(columns) + 1.5, 0.9 * len(rows) + 1.2))
    masked = np.ma.masked_invalid(values)
    finite = values[np.isfinite(values)]
    if centre is not None and finite.size:
        span = max(float(np.abs(finite - centre).max()), 1e-3)
        image = ax.imshow(masked, cmap="RdBu", vmin=centre - span, vmax=centre + span, aspect="auto")
    else:
        image = ax.imshow(masked, cmap="viridis", aspect="auto")
    for i in range(len(rows)):
        for j in range(len(columns)):
            shade = image.norm(values[i, j]) if np.isfinite(values[i, j]) else 0.5
            dark = (shade < 0.2 or shade > 0.8) if centre is not None else shade < 0.4  # white text on dark cells
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(len(columns)), [str(c) for c in columns])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return save(fig, path)


def interval_panel(path: Path, groups: dict[str, dict[str, tuple[float, float, float]]], ylabel: str,
                   title: str, order: Optional[list[str]] = None) -> str:
    """Points with 95% intervals side by side: ``{group: {variant: (mean, low, high)}}``; the variants
    named in ``order`` first, in that order, then the rest sorted."""
    fig, ax = plt.subplots(figsize=(1.6 * max(len(groups), 1) + 2, 3.5))
    found = {v for g in groups.values() for v in g}
    variants = [v for v in order or [] if v in found] + sorted(found - set(order or []))
    width = 0.8 / max(len(variants), 1)
    for k, variant in enumerate(variants):
        xs, means, errors = [], [], [[], []]
        for i, values in enumerate(groups.values()):
            if variant in values:
                mean, low, high = values[variant]
                xs.append(i - 0.4 + width * (k + 0.5))
                means.append(mean)
                errors[0].append(mean - low)
                errors[1].append(high - mean)
        ax.errorbar(xs, means, yerr=errors, fmt="o", capsize=3, label=variant)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: never over an interval
    return save(fig, path)
