"""WiSE-FT's mixing weight chosen on the multi-clinic yardstick.

    python tools/wise_ft_yardstick.py runs/yardstick/student_lpft [--weights 0,0.25,0.5,0.75] [--out FOLDER]
        [--bootstrap 500]

The yardstick's runs must have trained with ``train.linear_probe: true`` (LP-FT), which keeps
each run's start (the pretrained backbone with its fitted linear head) in ``<stage>/start/``.
For every held-out clinic, seed and weight ``w``, the model ``(1 - w) x start + w x fine-tuned``
is made (``<stage>/wise/w<w>/``, a soup of the two with coefficients ``1 - w, w``) and scored
like every run: its holdout and external sets. ``w = 1`` is the run itself. ``wise_ft.md``
lists, per weight, each clinic's mean over seeds, the leave-one-clinic-out mean with its
spread over seeds, the paired difference from ``w = 1`` (same images and seeds; 95% interval
resampling lesions) and the external sets (reported, never chosen on). The weight with the
highest leave-one-clinic-out mean is marked: set it as ``train.wise_ft`` for the shipped
recipe. It is chosen on the same yardstick it is scored on, so its row is optimistic by the
choice; the table says so. Interpolations already scored are reused; the last line printed is
``wise-ft: <table>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from melanoma_tf import metrics as M
from melanoma_tf import yardstick as Y
from melanoma_tf.cli import run_main
from melanoma_tf.errors import MelanomaTfError
from melanoma_tf.evaluation import evaluate
from melanoma_tf.files import write_atomic, write_json
from melanoma_tf.finetune import START
from melanoma_tf.runs import resolve_stage_dir
from melanoma_tf.combine import make_soup

log = logging.getLogger("melanoma_tf.wise_ft")


class WiseError(MelanomaTfError, ValueError):
    """The yardstick cannot be scored as asked; the message names the folder or option."""


def _weights(text: str) -> list[float]:
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise WiseError(f"--weights {text!r}: expected numbers in [0, 1] separated by commas") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise WiseError(f"--weights {text!r}: expected numbers in [0, 1] separated by commas")
    return [v for v in values if v != 1.0]


def scored_folder(stage: Path, weight: float, n_boot: int) -> Path:
    """The stage's interpolation with ``weight`` on the fine-tuned side, made and scored once."""
    folder = stage / "wise" / f"w{weight:g}"
    if not (folder / "eval_holdout" / "metrics.json").is_file():
        make_soup([stage / START, stage], folder, [1.0 - weight, weight])
        evaluate(str(folder), n_boot=n_boot, gradcam=0, latency_runs=5, relation=False)
    return folder


def collect(root: Path, weights: list[float], n_boot: int) -> tuple[dict, list[str], list[int], list[str]]:
    """``{weight: {clinic: {seed: eval_holdout folder}}}`` over the plan's clinics and finished LP-FT runs."""
    plan_file = root / "plan.json"
    if not plan_file.is_file():
        raise WiseError(f"{root}: not a yardstick folder (no plan.json)")
    plan = json.loads(plan_file.read_text())
    clinics, seeds = list(plan["clinics"]), list(plan["seeds"])
    found: dict[float, dict[str, dict[int, Path]]] = {w: {c: {} for c in clinics} for w in weights + [1.0]}
    missing = []
    for clinic in clinics:
        for seed in seeds:
            run = Y.run_folder(root, clinic, seed)
            metrics = Y.holdout_metrics_path(run)
            if metrics is None:
                continue
            stage = resolve_stage_dir(run)
            if not (stage / START / "model.keras").is_file():
                missing.append(f"{clinic}/seed{seed}")
                continue
            found[1.0][clinic][seed] = metrics.parent
            for weight in weights:
                found[weight][clinic][seed] = scored_folder(stage, weight, n_boot) / "eval_holdout"
    if missing:
        raise WiseError(f"{root}: {', '.join(missing)} trained without train.linear_probe (no {START}/ folder): "
                        "WiSE-FT interpolates from the linear-probe start")
    if not any(found[1.0][c] for c in clinics):
        raise WiseError(f"{root}: no finished run of {', '.join(clinics)} yet")
    externals = sorted({p.name for c in clinics for d in found[1.0][c].values()
                        for p in (d / "external").glob("*") if (p / "predictions.csv").is_file()})
    return found, clinics, seeds, externals


def summarise(found: dict, clinics: list[str], externals: list[str], n_boot: int) -> dict:
    """Per weight: clinic means, the LOCO mean and its seed spread, the paired difference from w = 1, externals."""
    rows = {}
    for weight, by_clinic in found.items():
        per_clinic = {c: {s: M.roc_auc(f["label"], f["probability"])
                          for s, d in runs.items() for f in [Y.read_predictions(d)]}
                      for c, runs in by_clinic.items() if runs}
        seeds = sorted(set.intersection(*(set(v) for v in per_clinic.values()))) if per_clinic else []
        loco = [np.mean([per_clinic[c][s] for c in per_clinic]) for s in seeds]
        row = {"clinics": {c: float(np.mean(list(v.values()))) for c, v in per_clinic.items()},
               "loco_mean": float(np.mean(loco)) if loco else None,
               "loco_sd": float(np.std(loco, ddof=1)) if len(loco) > 1 else None, "seeds": seeds}
        if weight != 1.0 and seeds:
            replicates, differences = [], []
            for clinic in per_clinic:
                result = Y.paired_difference([Y.read_predictions(found[weight][clinic][s]) for s in seeds],
                                             [Y.read_predictions(found[1.0][clinic][s]) for s in seeds], n_boot)
                replicates.append(result["replicates"])
                differences.append(result["difference"])
            both = np.mean(replicates, axis=0)
            row["vs_finetuned"] = {"difference": float(np.mean(differences)),
                                   "low": float(np.percentile(both, 2.5)), "high": float(np.percentile(both, 97.5))}
        for name in externals:
            values = [M.roc_auc(f["label"], f["probability"]) for runs in by_clinic.values() for d in runs.values()
                      if (d / "external" / name / "predictions.csv").is_file()
                      for f in [Y.read_predictions(d, name)]]
            row[name] = float(np.mean(values)) if values else None
        rows[weight] = row
    return rows


def write_table(root: Path, out: Path, rows: dict, clinics: list[str], externals: list[str]) -> Path:
    scored = {w: r for w, r in rows.items() if r["loco_mean"] is not None}
    best = max(scored, key=lambda w: scored[w]["loco_mean"])
    lines = [f"# WiSE-FT on the yardstick: {root.name}", "",
             "Each run's model interpolated with its linear-probe start: (1 - w) x start + w x fine-tuned "
             "(w = 0: the linear probe alone; w = 1: LP-FT as trained). LOCO: per seed the mean held-out ROC-AUC "
             "over clinics, then mean (sd) over seeds; vs w = 1: paired difference on the same images and seeds, "
             "95% interval resampling lesions. External sets: mean over the same models, reported, never chosen on. "
             f"**Bold**: the highest LOCO mean, chosen on this table (so its row is optimistic by the choice).", "",
             "| w | LOCO ROC-AUC (sd) | vs w = 1 [95% CI] | " + " | ".join(clinics)
             + "".join(f" | {e}" for e in externals) + " |",
             "|---|---|---|" + "---|" * len(clinics) + "---|" * len(externals)]
    for weight in sorted(rows):
        row = rows[weight]
        if row["loco_mean"] is None:
            continue
        sd = f" ({row['loco_sd']:.3f})" if row["loco_sd"] is not None else ""
        paired = row.get("vs_finetuned")
        cell = f"{paired['difference']:+.3f} [{paired['low']:+.3f}, {paired['high']:+.3f}]" if paired else ""
        mark = "**" if weight == best else ""
        lines.append(f"| {mark}{weight:g}{mark} | {mark}{row['loco_mean']:.3f}{mark}{sd} | {cell} | "
                     + " | ".join(f"{row['clinics'].get(c, float('nan')):.3f}" for c in clinics)
                     + "".join(f" | {row[e]:.3f}" if row.get(e) is not None else " | " for e in externals) + " |")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "wise_ft.json", {"yardstick": root.name, "chosen_weight": best,
                                      "weights": {f"{w:g}": r for w, r in rows.items()}})
    write_atomic(out / "wise_ft.md", "\n".join(lines) + "\n")
    return out / "wise_ft.md"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python tools/wise_ft_yardstick.py", description=__doc__.split("\n")[0])
    parser.add_argument("yardstick", help="a yardstick folder whose runs trained with train.linear_probe: true")
    parser.add_argument("--weights", default="0,0.25,0.5,0.75", help="the fine-tuned side's weights besides 1")
    parser.add_argument("--out", help="where wise_ft.md/json go (default: the yardstick folder)")
    parser.add_argument("--bootstrap", type=int, default=500, help="bootstrap replicates of each interval")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> str:
        root = Path(args.yardstick)
        weights = _weights(args.weights)
        found, clinics, _, externals = collect(root, weights, args.bootstrap)
        rows = summarise(found, clinics, externals, args.bootstrap)
        table = write_table(root, Path(args.out) if args.out else root, rows, clinics, externals)
        print(table.read_text())
        return f"wise-ft: {table}"

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())
