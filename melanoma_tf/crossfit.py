"""Cross-fitting: a model trained on every labelled image outside the holdout, with an honest operating point.

    python -m melanoma_tf.crossfit --config configs/reference_ham10000.yaml --folds 5 --out runs/crossfit \\
        [--set key=value ...] [--combine ensemble|soup] [--evaluate]

A single run trains on 64% of the images: validation (16%) only chooses the epoch, the threshold
and the calibration, and the holdout (20%) only reports. Cross-fitting trains K fold models on the
non-holdout images, each validated on its own fold (``data.folds = K``, ``data.fold = k``), so every
one of those images is trained on by K - 1 of them and scored, out of fold, by the one that did not
see it. The K models are combined into one (``ensemble``: the mean of their logits, K times the size;
``soup``: the mean of their weights, one model's size), and the combination's threshold (95%
sensitivity), temperature, referral band and Platt calibration are fitted on the out-of-fold logits
of all non-holdout images instead of on a validation split it trained on. The holdout is the same for
every fold and stays untouched.

``--out`` becomes a run folder: ``fold<k>/`` (each an ordinary run, resumable: run the same command
again after a kill and finished folds are kept), ``model.keras`` (the combination), ``splits.csv``
(holdout as before, every other image ``train``), ``oof_logits.csv`` (image, lesion, fold, melanoma
label, out-of-fold melanoma logit) and ``crossfit.json``. ``evaluate``, ``quantize`` (post-training
modes: QAT needs a validation split) and ``export_app`` take it; ``evaluate`` uses the out-of-fold
logits wherever a run's validation split would be used. The operating point is fitted on the fold
models' own logits, which the combination's logits follow closely but not exactly (its logit is their
mean): the honest price of having no unseen validation image left.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from melanoma_tf import config as cfgmod
from melanoma_tf import data as datamod
from melanoma_tf import metrics as M
from melanoma_tf.cli import run_main
from melanoma_tf.combine import make_ensemble, make_soup
from melanoma_tf.evaluation import evaluate, load_any_model, melanoma_logit
from melanoma_tf.files import write_atomic, write_json
from melanoma_tf.pipeline import load_images
from melanoma_tf.runs import OOF_FILE, RunError, find_resumable, resolve_stage_dir, split_frame

log = logging.getLogger(__name__)

COMBINE = ("ensemble", "soup")


def train_folds(config: str | Path, overrides: Sequence[str], folds: int, out: Path) -> list[Path]:
    """Trains (or resumes, or keeps) the K fold models in ``out/fold<k>``; returns their run folders.

    Each fold is ``python -m melanoma_tf.train`` in its own process (its log: ``out/fold<k>.log``), as the
    yardstick trains its runs: a killed fold continues from its last epoch when the command is run again.
    """
    if folds < 2:
        raise cfgmod.ConfigError(f"--folds {folds}: cross-fitting needs at least 2 folds")
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for k in range(folds):
        folder = out / f"fold{k}"
        fold_overrides = [*overrides, f"data.folds={folds}", f"data.fold={k}", "output.evaluate=false"]
        cfg = cfgmod.load(config, fold_overrides)  # a bad config fails here, before any training
        if (folder / "config.yaml").is_file():
            find_resumable(cfg, str(folder))  # a fold of another config is never kept (or continued)
        if _finished(folder):
            log.info("fold %d of %d already trained in %s", k + 1, folds, folder)
        else:
            log.info("training fold %d of %d in %s (log: %s.log)", k + 1, folds, folder, folder)
            sets = [a for o in fold_overrides for a in ("--set", o)]
            with open(f"{folder}.log", "ab") as handle:
                subprocess.run([sys.executable, "-m", "melanoma_tf.train", "--config", str(config), *sets,
                                "--run-dir", str(folder)], stdout=handle, stderr=subprocess.STDOUT, check=True)
        runs.append(folder)
    return runs


def _finished(folder: Path) -> bool:
    try:
        return (resolve_stage_dir(folder) / "metrics.json").is_file()
    except RunError:
        return False


def out_of_fold(runs: Sequence[Path]) -> pd.DataFrame:
    """Each non-holdout image's melanoma logit from the one fold model that did not train on it.

    Raises:
      RunError: the folds do not share one holdout, or their validation folds overlap or leave an image out.
    """
    stages = [resolve_stage_dir(r) for r in runs]
    manifests = [datamod.read_split_manifest(s / "splits.csv") for s in stages]
    holdout = set(manifests[0].loc[manifests[0]["split"] == "holdout", "image_id"])
    rest = set(manifests[0].loc[manifests[0]["split"] != "holdout", "image_id"])
    parts, seen = [], set()
    for k, (stage, manifest) in enumerate(zip(stages, manifests)):
        if set(manifest.loc[manifest["split"] == "holdout", "image_id"]) != holdout:
            raise RunError(f"{stage}: another holdout than {stages[0]}: not folds of one cross-fit")
        cfg = cfgmod.load(stage / "config.yaml")
        val = split_frame(cfg, stage, "val")
        overlap = seen & set(val["image_id"])
        if overlap:
            raise RunError(f"{stage}: validates on {len(overlap)} image(s) another fold validated on "
                           f"(first: {sorted(overlap)[0]}): not folds of one cross-fit")
        seen |= set(val["image_id"])
        model = load_any_model(stage / "model.keras")
        z = melanoma_logit(model.logits(load_images(val["path"].tolist(), model.input_size)), cfg.data.labels)
        melanoma = (val["label"].to_numpy() if cfg.data.labels == "binary"
                    else (val["label"].to_numpy() == datamod.DX_CLASSES.index(datamod.MELANOMA)).astype(int))
        parts.append(pd.DataFrame({"image_id": val["image_id"].to_numpy(), "lesion_id": val["lesion_id"].to_numpy(),
                                   "fold": k, "melanoma": melanoma, "logit": z}))
    if seen != rest:
        missing, foreign = sorted(rest - seen), sorted(seen - rest)
        first = f"first: {(missing or foreign)[0]}"
        raise RunError(f"the folds' validation splits do not tile {stages[0]}'s non-holdout images: {len(missing)} "
                       f"in none of them, {len(foreign)} not in its split ({first})")
    return pd.concat(parts, ignore_index=True).sort_values("image_id", kind="stable").reset_index(drop=True)


def crossfit(config: str | Path, overrides: Sequence[str], folds: int, out: str | Path,
             combine: str = "ensemble") -> Path:
    """Trains the folds, combines them into ``out`` and writes the out-of-fold logits; returns ``out``."""
    if combine not in COMBINE:
        raise cfgmod.ConfigError(f"--combine {combine}: choose from {list(COMBINE)}")
    out = Path(out)
    runs = train_folds(config, overrides, folds, out)
    oof = out_of_fold(runs)
    if combine == "ensemble":
        make_ensemble(runs, out)
    else:
        make_soup(runs, out)
    manifest = datamod.read_split_manifest(out / "splits.csv")
    manifest.loc[manifest["split"] != "holdout", "split"] = "train"  # the combination trained on all of them
    write_atomic(out / "splits.csv", manifest.to_csv(index=False))
    write_atomic(out / OOF_FILE, oof.to_csv(index=False))
    y, z = oof["melanoma"].to_numpy(), oof["logit"].to_numpy()
    write_json(out / "crossfit.json", {
        "folds": folds, "combine": combine, "fold_runs": [r.name for r in runs],
        "n_out_of_fold": len(oof), "n_melanoma": int(y.sum()),
        "out_of_fold_roc_auc": M.roc_auc(y, z),
        "per_fold_roc_auc": {int(k): M.roc_auc(g["melanoma"], g["logit"]) if g["melanoma"].nunique() == 2 else None
                             for k, g in oof.groupby("fold")},
        "operating_point": "threshold, temperature, referral band and Platt calibration fitted on the "
                           "out-of-fold logits (evaluate reads oof_logits.csv)"})
    log.info("cross-fit of %d folds (%s): out-of-fold ROC-AUC %.4f on %d images", folds, combine,
             M.roc_auc(y, z), len(oof))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", required=True, help="the cross-fit's run folder (fold runs inside)")
    parser.add_argument("--combine", default="ensemble", help="ensemble (mean logit) or soup (mean weights)")
    parser.add_argument("--evaluate", action="store_true", help="then score it on the holdout and external sets")
    args = parser.parse_args(argv)

    def go() -> str:
        out = crossfit(args.config, args.overrides, args.folds, args.out, args.combine)
        if args.evaluate:
            return f"crossfit: {out}; report: {evaluate(str(out))}"
        return f"crossfit: {out}"

    return run_main(go)


if __name__ == "__main__":
    raise SystemExit(main())
