"""Measure fine-tuning recipe choices on validation and on a leave-one-clinic-out split.

    python tools/recipe_ablation.py --config configs/reference_ham10000.yaml [--source rosendahl]
        [--out runs/recipe_ablation] [--results results/recipe_ablation.md] [--set key=value ...]

Each choice (a set of ``--set`` overrides on the student stage of the config) is trained
twice with ``python -m melanoma_tf.train``: on the config's lesion-grouped split (its
validation melanoma-vs-rest ROC-AUC is the first measure) and with every image of one HAM10000
source held out (``data.holdout_source``; that clinic's melanoma ROC-AUC, at the run's own
validation threshold, is the second). No external test set is scored or looked at: choices are
made on these two. Each run has a fixed folder, so the script is resumable: finished runs are
skipped, a killed one continues from its last epoch. Writes a markdown table, keeping the rows
of choices not run this time when the table was made from the same config, overrides and
source; the last line printed is ``ablation: <table>``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# choice -> overrides; "baseline" is the config as it is
CHOICES = {
    "baseline": [],
    "ema 0.99": ["train.ema_decay=0.99"],
    "backbone lr x0.3": ["train.backbone_lr_scale=0.3"],
    "shades of grey": ["data.colour_constancy=shades_of_grey"],
    # the seven HAM10000 diagnoses as targets (melanoma = its softmax probability): benign keratoses, the
    # hard negatives of other clinics' images, become a class of their own instead of part of "rest"
    "7-class labels": ["data.labels=multiclass"],
}


def run_one(config: Path, overrides: list[str], folder: Path) -> dict:
    """Trains and evaluates one run in ``folder`` (skipped when done); returns its val and holdout ROC-AUC.

    Both are melanoma vs rest, whatever the labels the run trained on (a 7-class run's own
    ``val_roc_auc`` is the macro mean over classes, so validation is scored again here).
    """
    holdout = folder / "eval_holdout" / "metrics.json"
    if not holdout.is_file():
        command = [sys.executable, "-m", "melanoma_tf.train", "--config", str(config), "--run-dir", str(folder),
                   "--set", "stages=[student]", "--set", "output.evaluate=true", "--set", "data.external=[]"]
        for item in overrides:
            command += ["--set", item]
        subprocess.run(command, check=True, cwd=ROOT)
    val = folder / "eval_val" / "metrics.json"
    if not val.is_file():
        subprocess.run([sys.executable, "-m", "melanoma_tf.evaluate", "--run", str(folder), "--split", "val",
                        "--no-external", "--gradcam", "0", "--bootstrap", "200", "--latency-runs", "1"],
                       check=True, cwd=ROOT)
    metrics = json.loads(holdout.read_text())
    return {"val_roc_auc": json.loads(val.read_text())["roc_auc"],
            "holdout_roc_auc": metrics["roc_auc"], "holdout_ci": metrics.get("roc_auc_ci"),
            "n_holdout": metrics.get("n_images")}


def kept_rows(results: Path, header: list[str], names: list[str]) -> dict[str, str]:
    """The rows of an earlier table at ``results`` for choices not in ``names``, if it has the same ``header``."""
    if not results.is_file():
        return {}
    lines = results.read_text().splitlines()
    if lines[:len(header)] != header:
        return {}
    rows = {line.split(" | ")[0][2:]: line for line in lines[len(header):] if line.startswith("| ")}
    return {name: row for name, row in rows.items() if name not in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--source", default="rosendahl", help="the HAM10000 source held out (dataset column)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "recipe_ablation")
    parser.add_argument("--results", type=Path, default=ROOT / "results" / "recipe_ablation.md")
    parser.add_argument("--choices", default=",".join(CHOICES), help="comma-separated names of CHOICES")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    names = [c.strip() for c in args.choices.split(",") if c.strip()]
    unknown = [n for n in names if n not in CHOICES]
    if unknown:
        print(f"error: --choices: unknown {unknown}; choose from {list(CHOICES)}", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        slug = name.replace(" ", "_").replace(".", "")
        base = args.overrides + CHOICES[name]
        split = run_one(args.config, base, args.out / f"{slug}-split")
        loco = run_one(args.config, base + [f"data.holdout_source={args.source}"], args.out / f"{slug}-{args.source}")
        rows.append((name, split, loco))
    header = [f"# Recipe choices: validation and leave-{args.source}-out ROC-AUC", "",
              f"Config `{args.config.name}` (student stage), overrides {args.overrides or 'none'}; "
              f"reproduce: `python tools/recipe_ablation.py --config {args.config.as_posix()}`. "
              "One seed per cell: differences below ~0.01-0.02 are within the noise of a single run.", "",
              f"| choice | val ROC-AUC (lesion split) | val ROC-AUC ({args.source} out) | {args.source} ROC-AUC "
              "[95% CI] |", "|---|---|---|---|"]
    table = kept_rows(args.results, header, names)
    for name, split, loco in rows:
        ci = loco["holdout_ci"]
        ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        table[name] = (f"| {name} | {split['val_roc_auc']:.3f} | {loco['val_roc_auc']:.3f} | "
                       f"{loco['holdout_roc_auc']:.3f}{ci_text} (n={loco['n_holdout']}) |")
    lines = header + [table[name] for name in CHOICES if name in table]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.results.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(args.results)
    print("\n".join(lines))
    print(f"ablation: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
