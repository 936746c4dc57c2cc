"""The Markdown report of one evaluation, and a comparison of several (a library; the command is
``python -m melanoma_tf.compare``).

:func:`compare` reads each evaluation's ``metrics.json`` and ``predictions.csv``
(given an evaluation folder, or a run folder holding ``eval_<split>*``
folders) and writes ``compare.md``, ``compare.csv``, one ROC plot and
ROC-AUC against size and against latency.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import pandas as pd

from melanoma_tf import plots
from melanoma_tf.files import write_atomic

# The first table of every report and of compare: (key, header, format).
SUMMARY_COLUMNS = [
    ("roc_auc", "ROC-AUC", "{:.3f}"), ("pr_auc", "PR-AUC", "{:.3f}"), ("threshold", "threshold", "{:.3g}"),
    ("sensitivity", "sens", "{:.3f}"), ("specificity", "spec", "{:.3f}"), ("ppv", "PPV", "{:.3f}"),
    ("npv", "NPV", "{:.3f}"), ("f1", "F1", "{:.3f}"), ("ece", "ECE", "{:.3f}"),
    ("ece_calibrated", "ECE (T-scaled)", "{:.3f}"), ("params", "params", "{:,}"),
    ("flops", "MACs/image", "{:,}"), ("size_mb", "size MB", "{:.2f}"),
    ("latency_ms_median", "latency ms (p50)", "{:.2f}"), ("latency_ms_p90", "p90", "{:.2f}"),
]


def fmt(value, pattern: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    try:
        return pattern.format(value)
    except (ValueError, TypeError):
        return str(value)


def with_ci(metrics: dict, key: str) -> str:
    ci = metrics.get(f"{key}_ci")
    text = fmt(metrics.get(key))
    return f"{text} [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else text


def summary_row(metrics: dict) -> list[str]:
    cells = []
    for key, _, pattern in SUMMARY_COLUMNS:
        cells.append(with_ci(metrics, key) if key in ("roc_auc", "pr_auc") else fmt(metrics.get(key), pattern))
    return cells


EXTERNAL_COLUMNS = [("roc_auc", "ROC-AUC [95% CI]"), ("pr_auc", "PR-AUC [95% CI]"), ("sensitivity", "sens"),
                    ("specificity", "spec"), ("ece", "ECE"), ("ece_calibrated", "ECE (T-scaled)"),
                    ("n_images", "images"), ("n_melanoma", "melanomas")]


def not_scored(entry: dict) -> str:
    """Why an external set has no scores ('skipped: ...', 'failed: ...'), or '' when it has them."""
    for reason in ("skipped", "failed"):
        if reason in entry:
            return f"{reason}: {entry[reason]}"
    return ""


def external_table(sets: dict) -> str:
    """One row per data set (holdout first, then each external set) of one model."""
    rows = []
    for name, m in sets.items():
        if not_scored(m):
            rows.append([name, not_scored(m)] + [""] * (len(EXTERNAL_COLUMNS) - 1))
            continue
        rows.append([name] + [with_ci(m, k) if k in ("roc_auc", "pr_auc") else
                              fmt(m.get(k), "{}" if k.startswith("n_") else "{:.3f}") for k, _ in EXTERNAL_COLUMNS])
    return table(["data"] + [h for _, h in EXTERNAL_COLUMNS], rows)


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def resampling_unit(metrics: dict) -> str:
    """What the bootstrap resampled, as the report says it: 'resampling 312 lesions', 'resampling 199 images'."""
    grouping = metrics.get("bootstrap_grouping")
    if not grouping:
        return "resampling lesions"
    n, unit = grouping["n_groups"], grouping["unit"]
    if unit == "lesions and images":
        return (f"resampling {n} lesions and images: {grouping['n_without_lesion_id']} images without a lesion id "
                "are each their own")
    return f"resampling {n} {unit}"


def write_report(out_dir: Path, metrics: dict, figures: dict, gallery: list[dict]) -> Path:
    """Writes ``report.md`` for one evaluation; returns its path."""
    out_dir = Path(out_dir)
    name = metrics.get("model_name", "model")
    lines = [f"# {name} on {metrics.get('split')} ({metrics.get('n_images')} images, "
             f"{metrics.get('n_melanoma')} melanomas)", "",
             f"Model: `{metrics.get('model')}`. Threshold chosen on {metrics.get('threshold_source')} "
             f"for sensitivity >= {fmt(metrics.get('target_sensitivity'), '{:.2f}')}"
             + (f" (validation sensitivity there {fmt(metrics.get('val_sensitivity'))})."
                if metrics.get("val_sensitivity") is not None else "."), "",
             table([h for _, h, _ in SUMMARY_COLUMNS], [summary_row(metrics)]), "",
             f"ROC-AUC and PR-AUC with 95% bootstrap intervals ({resampling_unit(metrics)}). Sensitivity, "
             "specificity, PPV, "
             "NPV and F1 are at the fixed threshold; ECE uses 10 equal-mass bins, before and after temperature "
             f"scaling fitted on validation (T = {fmt(metrics.get('temperature'), '{:.2f}')}); Brier "
             f"{fmt(metrics.get('brier'))} -> {fmt(metrics.get('brier_calibrated'))}; ECE after Platt scaling "
             f"(which also corrects the base rate shifted by class-weighted training) {fmt(metrics.get('ece_platt'))}. "
             f"Latency: batch 1, one thread, "
             f"median of {metrics.get('latency_runs')} runs on this machine ({metrics.get('runtime')}).", "",
             *([f"{metrics['n_skipped_unreadable']} listed image(s) could not be decoded and were left out "
                f"(first: {', '.join(metrics.get('skipped_unreadable', [])[:3])}).", ""]
               if metrics.get("n_skipped_unreadable") else []),
             "## Referral band", "",
             f"Images whose calibrated logit lies within {fmt(metrics.get('refer_margin_logit'), '{:.2f}')} of the "
             f"threshold are referred to a dermatologist: {fmt(100 * metrics.get('refer_fraction', float('nan')), '{:.1f}')}% "
             f"of these images ({metrics.get('referred_melanomas')} melanomas among them). On the images decided "
             f"automatically: sensitivity {fmt(metrics.get('decided_sensitivity'))}, specificity "
             f"{fmt(metrics.get('decided_specificity'))}.", ""]
    if metrics.get("external"):
        lines += ["## External test sets", "",
                  "The same model and the same validation-chosen threshold and temperature on images from other "
                  "clinics and devices, beside this split. Never trained, tuned or chosen on.", "",
                  external_table({metrics.get("split", "this split"): metrics, **metrics["external"]}), ""]
    for key, title in (("roc", "ROC curve"), ("pr", "Precision-recall curve"), ("reliability", "Reliability diagram"),
                       ("threshold_sweep", "Threshold sweep"), ("confusion", "Confusion matrix at the threshold"),
                       ("confusion_multiclass", "Multiclass confusion matrix")):
        if key in figures:
            lines += [f"## {title}", "", f"![{title}]({figures[key]})", ""]
    if "relation" in metrics:
        rel = metrics["relation"]
        lines += ["## Feature relations", "",
                  f"Cosine similarity of the embeddings (the head's input) on these images: intra-class "
                  f"{fmt(rel['intra'])}, inter-class {fmt(rel['inter'])}, Rd = {fmt(rel['rd'])} "
                  "(higher: classes better separated).", ""]
        if "relation_matrix" in figures:
            lines += [f"![relation matrix]({figures['relation_matrix']})", ""]
    if "multiclass" in metrics:
        mc = metrics["multiclass"]
        lines += ["## Multiclass", "", f"BMA {fmt(mc['bma'])}, macro F1 {fmt(mc['macro_f1'])}, "
                  f"accuracy {fmt(mc['accuracy'])}.", "",
                  table(["class", "AUC"], [[k, fmt(v)] for k, v in mc["per_class_auc"].items()]), ""]
    subgroups = metrics.get("subgroups") or []
    if subgroups:
        lines += ["## Subgroup audit", "",
                  f"At the fixed threshold; flagged (!) where sensitivity is more than 5 points below the overall "
                  f"{fmt(metrics.get('sensitivity'))}. Small groups are noisy: read the counts.", "",
                  table(["attribute", "group", "n", "melanomas", "ROC-AUC", "sensitivity", "flag"],
                        [[r["attribute"], r["group"], r["n"], r["n_melanoma"], fmt(r["roc_auc"]),
                          fmt(r["sensitivity"]), "!" if r["flag"] else ""] for r in subgroups]), ""]
    if gallery:
        lines += ["## Grad-CAM: the most confident errors", "",
                  "Left: the image as the model sees it; right: Grad-CAM of the melanoma logit.", ""]
        lines += [f"- {g['kind']} `{g['image_id']}` (p = {g['probability']:.3f})\n\n  ![{g['image_id']}]({g['file']})"
                  for g in gallery]
        lines.append("")
    path = out_dir / "report.md"
    write_atomic(path, "\n".join(lines))
    return path


# --------------------------------------------------------------------------- compare


def find_evaluations(paths: list[str], split: str = "holdout") -> list[Path]:
    """Evaluation folders: given directly, or every ``eval_<split>*`` under a run folder (and its stages)."""
    found = []
    for raw in paths:
        path = Path(raw)
        if (path / "metrics.json").is_file() and (path / "predictions.csv").is_file():
            found.append(path)
            continue
        hits = sorted(p.parent for p in path.glob(f"eval_{split}*/metrics.json"))
        hits += sorted(p.parent for p in path.glob(f"*/eval_{split}*/metrics.json"))
        if not hits:
            raise FileNotFoundError(f"{path}: no evaluation (metrics.json + predictions.csv) for split {split!r}; "
                                    "run python -m melanoma_tf.evaluate first")
        found.extend(hits)
    return found


def compare(paths: list[str], out: Optional[str] = None, split: str = "holdout") -> Path:
    """Writes the comparison table and plots; returns the path of ``compare.md``."""
    evaluations = find_evaluations(paths, split)
    out_dir = Path(out) if out else Path("runs") / "compare"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, curves, names = [], {}, []
    for folder in evaluations:
        metrics = json.loads((folder / "metrics.json").read_text())
        name = metrics.get("model_name") or folder.parent.name
        while name in names:
            name += "'"
        names.append(name)
        predictions = pd.read_csv(folder / "predictions.csv")
        y = predictions["label"].to_numpy()
        if y.max() > 1:  # multiclass: melanoma vs rest
            y = (y == 4).astype(int)
        curves[name] = (y, predictions["probability"].to_numpy())
        external = {k: v for k, v in (metrics.get("external") or {}).items() if not not_scored(v)}
        rows.append({"model": name, "folder": str(folder), **{k: metrics.get(k) for k, _, _ in SUMMARY_COLUMNS},
                     "roc_auc_ci": metrics.get("roc_auc_ci"), "pr_auc_ci": metrics.get("pr_auc_ci"),
                     "n_images": metrics.get("n_images"),
                     **{f"{ext}_{k}": v.get(k) for ext, v in external.items()
                        for k in ("roc_auc", "roc_auc_ci", "sensitivity", "specificity", "ece_calibrated")}})
    frame = pd.DataFrame(rows)
    write_atomic(out_dir / "compare.csv", frame.to_csv(index=False))
    figures = {"roc": plots.roc_plot(out_dir / "roc.png", curves)}
    sized = frame.dropna(subset=["size_mb"])
    if len(sized):
        figures["auc_vs_size"] = plots.scatter_plot(out_dir / "auc_vs_size.png", sized["size_mb"].tolist(),
                                                    sized["roc_auc"].tolist(), sized["model"].tolist(),
                                                    "size on disk (MB)", "ROC-AUC vs size")
    timed = frame.dropna(subset=["latency_ms_median"])
    if len(timed):
        figures["auc_vs_latency"] = plots.scatter_plot(out_dir / "auc_vs_latency.png",
                                                       timed["latency_ms_median"].tolist(), timed["roc_auc"].tolist(),
                                                       timed["model"].tolist(), "latency ms (batch 1, 1 thread)",
                                                       "ROC-AUC vs latency")
    lines = [f"# Comparison on {split}", "",
             table(["model"] + [h for _, h, _ in SUMMARY_COLUMNS],
                   [[r["model"]] + summary_row(r) for r in rows]), ""]
    external_sets = sorted({key[:-len("_roc_auc")] for r in rows for key in r if key.endswith("_roc_auc")
                            and key != "roc_auc"})
    if external_sets:
        lines += ["## Holdout vs external test sets", "",
                  "ROC-AUC with 95% bootstrap intervals; sensitivity / specificity at each model's "
                  "validation-chosen threshold; ECE after the validation-fitted temperature.", ""]
        headers = ["model", "holdout ROC-AUC", "holdout sens / spec"]
        for ext in external_sets:
            headers += [f"{ext} ROC-AUC", f"{ext} sens / spec", f"{ext} ECE (T)"]
        body = []
        for r in rows:
            cells = [r["model"], with_ci(r, "roc_auc"), f"{fmt(r.get('sensitivity'))} / {fmt(r.get('specificity'))}"]
            for ext in external_sets:
                cells += [with_ci({"v": r.get(f"{ext}_roc_auc"), "v_ci": r.get(f"{ext}_roc_auc_ci")}, "v"),
                          f"{fmt(r.get(f'{ext}_sensitivity'))} / {fmt(r.get(f'{ext}_specificity'))}",
                          fmt(r.get(f"{ext}_ece_calibrated"))]
            body.append(cells)
        lines += [table(headers, body), ""]
    lines += [f"![{k}]({v})\n" for k, v in figures.items()]
    path = out_dir / "compare.md"
    write_atomic(path, "\n".join(lines))
    return path
