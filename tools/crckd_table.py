"""The CRCKD paper's 7-class ablation table from a finished sweep, with paired intervals.

    python -m melanoma_tf.sweep --config configs/sweep_crckd_7class_mnv3.yaml      # trains (resumable)
    python tools/crckd_table.py runs/sweeps/sweep_crckd_7class_mnv3 --results results/crckd_7class
    python tools/crckd_table.py --results results/crckd_7class                      # again, from the archive

Xing et al. (MICCAI 2021) report the balanced multiclass accuracy (BMA: the mean per-class recall of the
arg-max diagnosis) of a student trained with and without each relational term, under five-fold
cross-validation. The sweep trains one model per method and fold; each is scored on its own fold's
validation images, so every non-holdout image is predicted once per method by a model that did not train on
it (out of fold). Per method this writes the pooled out-of-fold BMA with a 95% interval (lesions resampled),
its paired difference from the student alone (the sweep's first method) and from the mean teacher's KL term
alone (``B2``) on the same resamples, the per-fold BMA (mean +- sd), accuracy, macro F1 and the
melanoma-vs-rest ROC-AUC. The per-image predicted diagnoses are archived beside the table (``predictions.npz``,
``images.csv``: image and lesion ids, labels, folds; no paths) so that the table and its figure can be
written again on any machine.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from sklearn import metrics as skm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from melanoma_tf import data as D  # noqa: E402
from melanoma_tf import metrics as M  # noqa: E402
from melanoma_tf import plots  # noqa: E402
from melanoma_tf import sweep as S  # noqa: E402
from melanoma_tf.cli import run_main  # noqa: E402
from melanoma_tf.errors import MelanomaTfError  # noqa: E402
from melanoma_tf.files import write_atomic  # noqa: E402

PAPER_BMA = 0.7807  # CRCKD, DenseNet121 student and mean teacher, 224 px, HAM10000 (10,015 images), 5 folds
SECOND_BASELINE = "B2"  # the mean teacher's KL term alone: what each relational term is added to
CLASSES = list(D.DX_CLASSES)


class CrckdTableError(MelanomaTfError, ValueError):
    """The sweep or the archive cannot give the table; the message names the folder or file."""


def read_sweep(sweep: Path) -> tuple[list[str], pd.DataFrame, dict[str, np.ndarray]]:
    """(methods in the sweep's order, the out-of-fold images, per method its predicted class and P(mel)).

    Raises:
      CrckdTableError: naming the run when one is missing, unscored, not multiclass, or scored on other images.
    """
    spec_file = sweep / "sweep.json"
    if not spec_file.is_file():
        raise CrckdTableError(f"{sweep}: no sweep.json (not a python -m melanoma_tf.sweep output folder)")
    spec = json.loads(spec_file.read_text())
    if len(spec.get("axes", {})) != 1 or int(spec.get("folds", 0)) < 2:
        raise CrckdTableError(f"{spec_file}: the table needs one axis (the method) and K >= 2 folds")
    (axis, values), = spec["axes"].items()
    methods = list(values)
    images, arrays = None, {}
    for method in methods:
        frames = []
        for fold in range(int(spec["folds"])):
            run = sweep / S.trial_id({axis: method}) / f"fold-{fold}"
            file = run / "tflite" / "eval_val_keras" / "predictions.csv"
            if not file.is_file():
                raise CrckdTableError(f"{run}: not scored on its validation fold yet; run the sweep command again")
            frame = pd.read_csv(file, dtype={"image_id": str, "lesion_id": str})
            if "predicted_class" not in frame.columns:
                raise CrckdTableError(f"{file}: no predicted_class column (a binary model, or scored by an older "
                                      f"version): delete {run / 'tflite'} and run the sweep command again")
            frames.append(frame.assign(fold=fold))
        frame = pd.concat(frames).sort_values("image_id").reset_index(drop=True)
        if frame["image_id"].duplicated().any():
            raise CrckdTableError(f"{sweep / S.trial_id({axis: method})}: an image is in two validation folds")
        listed = frame[["image_id", "lesion_id", "label", "fold"]]
        if images is None:
            images = listed
        elif not listed.equals(images):
            raise CrckdTableError(f"{sweep / S.trial_id({axis: method})}: its folds hold other images than "
                                  f"{methods[0]}'s; the methods are not paired")
        unknown = set(frame["predicted_class"]) - set(CLASSES)
        if unknown:
            raise CrckdTableError(f"{sweep / S.trial_id({axis: method})}: unknown class(es) {sorted(unknown)}")
        arrays[f"{method}/predicted"] = frame["predicted_class"].map(CLASSES.index).to_numpy(np.int8)
        arrays[f"{method}/p_mel"] = frame["probability"].to_numpy(np.float32)
    return methods, images, arrays


def save_archive(folder: Path, methods: list[str], images: pd.DataFrame, arrays: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "images.csv", images.to_csv(index=False))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, methods=np.array(json.dumps(methods)), **arrays)
    write_atomic(folder / "predictions.npz", buffer.getvalue())


def load_archive(folder: Path) -> tuple[list[str], pd.DataFrame, dict[str, np.ndarray]]:
    try:
        images = pd.read_csv(folder / "images.csv", dtype={"image_id": str, "lesion_id": str})
        with np.load(folder / "predictions.npz", allow_pickle=False) as saved:
            methods = json.loads(str(saved["methods"]))
            arrays = {key: saved[key] for key in saved.files if key != "methods"}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise CrckdTableError(f"{folder}: no readable images.csv + predictions.npz ({err}); give the sweep folder "
                              "to write them") from None
    missing = [c for c in ("image_id", "lesion_id", "label", "fold") if c not in images.columns]
    if missing:
        raise CrckdTableError(f"{folder / 'images.csv'}: missing column(s) {missing}")
    for method in methods:
        for key in (f"{method}/predicted", f"{method}/p_mel"):
            if key not in arrays or len(arrays[key]) != len(images):
                raise CrckdTableError(f"{folder / 'predictions.npz'}: {key} is missing or does not have one value "
                                      f"for each of the {len(images)} images of images.csv")
    return methods, images, arrays


def _baselines(methods: list[str]) -> list[str]:
    """What every method is paired with: the sweep's first method (the student alone), and B2 when present."""
    return [methods[0]] + ([SECOND_BASELINE] if SECOND_BASELINE in methods[1:] else [])


def score(methods: list[str], images: pd.DataFrame, arrays: dict[str, np.ndarray], n_boot: int = 1000,
          seed: int = 0) -> pd.DataFrame:
    """One row per method: pooled out-of-fold BMA and interval, paired differences, per-fold scores."""
    y = images["label"].to_numpy(int)
    folds = images["fold"].to_numpy(int)
    index, _ = M.bootstrap_groups(images["lesion_id"].to_numpy())
    rng = np.random.default_rng(seed)
    weights = []  # each replicate: how often each image is drawn (its lesion's draws), the same for every method
    for _ in range(n_boot):
        drawn = np.bincount(rng.integers(0, index.max() + 1, index.max() + 1), minlength=index.max() + 1)
        weights.append(drawn[index].astype(float))
    replicates = {m: np.array([skm.balanced_accuracy_score(y, arrays[f"{m}/predicted"], sample_weight=w)
                               for w in weights]) for m in methods}
    references = _baselines(methods)
    rows = []
    for method in methods:
        predicted = arrays[f"{method}/predicted"]
        row = {"method": method, "bma": skm.balanced_accuracy_score(y, predicted)}
        row["bma_low"], row["bma_high"] = np.percentile(replicates[method], [2.5, 97.5])
        for reference in references:
            if reference != method:
                reference_bma = skm.balanced_accuracy_score(y, arrays[f"{reference}/predicted"])
                row[f"vs_{reference}"] = row["bma"] - reference_bma
                row[f"vs_{reference}_low"], row[f"vs_{reference}_high"] = np.percentile(
                    replicates[method] - replicates[reference], [2.5, 97.5])
        per_fold = {"bma": [], "accuracy": [], "macro_f1": [], "mel_roc_auc": []}
        for fold in np.unique(folds):
            rows_of = folds == fold
            per_fold["bma"].append(skm.balanced_accuracy_score(y[rows_of], predicted[rows_of]))
            per_fold["accuracy"].append(float(np.mean(y[rows_of] == predicted[rows_of])))
            per_fold["macro_f1"].append(float(skm.f1_score(y[rows_of], predicted[rows_of], average="macro",
                                                           labels=np.unique(y[rows_of]))))
            per_fold["mel_roc_auc"].append(M.roc_auc(y[rows_of] == CLASSES.index("mel"),
                                                     arrays[f"{method}/p_mel"][rows_of]))
        for key, values in per_fold.items():
            row[f"fold_{key}_mean"], row[f"fold_{key}_sd"] = float(np.mean(values)), float(np.std(values, ddof=1))
        rows.append(row)
    return pd.DataFrame(rows)


def _paired(row: dict, reference: str) -> str:
    key = f"vs_{reference}"
    if not np.isfinite(row.get(key, np.nan)):
        return ""
    return f"{row[key]:+.3f} [{row[key + '_low']:+.3f}, {row[key + '_high']:+.3f}]"


def write_table(folder: Path, table: pd.DataFrame, images: pd.DataFrame, n_boot: int) -> Path:
    methods = list(table["method"])
    references = _baselines(methods)
    n_folds = images["fold"].nunique()
    lines = ["# CRCKD's 7-class ablation, reproduced on 2 CPU cores", "",
             f"{len(images):,} non-holdout images of the shared HAM10000 subset, {n_folds} folds (stratified, "
             "lesion-grouped); every image predicted once per method, by the fold model that did not train on "
             "it. BMA: balanced multiclass accuracy (mean per-class recall of the arg-max diagnosis), pooled "
             f"over the folds, 95% interval from {n_boot} lesion resamples; vs: the paired difference on the "
             "same resamples. Per fold: mean +- sd over the folds' models. Each fold model is the one at its best "
             "validation epoch (melanoma ROC-AUC) on the same fold it is scored on, as in cross-validated papers.",
             "", "<!-- --8<-- [start:table] -->",
             "| method | BMA (out of fold) | " + " | ".join(f"vs {r}" for r in references)
             + " | BMA per fold | accuracy | macro F1 | melanoma ROC-AUC |",
             "|---|---|" + "---|" * len(references) + "---|---|---|---|"]
    for row in table.to_dict("records"):
        lines.append(f"| {row['method']} | {row['bma']:.3f} [{row['bma_low']:.3f}, {row['bma_high']:.3f}] | "
                     + " | ".join(_paired(row, r) for r in references)
                     + " | " + " | ".join(f"{row[f'fold_{k}_mean']:.3f} +- {row[f'fold_{k}_sd']:.3f}"
                                          for k in ("bma", "accuracy", "macro_f1", "mel_roc_auc")) + " |")
    lines.append(f"| *paper: CRCKD* (DenseNet121 student and mean teacher, 224 px, 80 epochs, all 10,015 images, "
                 f"5 folds) | {PAPER_BMA:.4f} |" + " |" * (len(references) + 4))
    lines.append("<!-- --8<-- [end:table] -->")
    figure = plots.interval_panel(
        folder / "crckd_bma.png", {m: {"out-of-fold BMA": (r["bma"], r["bma_low"], r["bma_high"])}
                                   for m, r in zip(methods, table.to_dict("records"))},
        "balanced multiclass accuracy", "7 classes, with and without each relational term")
    lines += ["", f"![{figure}]({figure})", ""]
    write_atomic(folder / "crckd.md", "\n".join(lines))
    write_atomic(folder / "crckd.csv", table.to_csv(index=False))
    return folder / "crckd.md"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", nargs="?", help="a finished sweep folder (without it: the archive in --results)")
    parser.add_argument("--results", required=True, help="folder of the table, its figure and its archive")
    parser.add_argument("--bootstrap", type=int, default=1000, help="lesion resamples (default 1000)")
    args = parser.parse_args(argv)

    def work() -> str:
        folder = Path(args.results)
        if args.sweep:
            methods, images, arrays = read_sweep(Path(args.sweep))
            save_archive(folder, methods, images, arrays)
        methods, images, arrays = load_archive(folder)
        table = score(methods, images, arrays, args.bootstrap)
        return f"crckd table: {write_table(folder, table, images, args.bootstrap)}"

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())
