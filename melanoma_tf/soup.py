"""Model soups: one model whose weights are the average of several fine-tuned runs (Wortsman et al. 2022).

    python -m melanoma_tf.soup --runs runs/a runs/b runs/c --out runs/soup [--coefficients 0.5,0.25,0.25]
        [--evaluate]

Students fine-tuned from the same pretrained start (seeds of one recipe, or recipes sharing
the start) usually sit in one basin of the loss, so the average of their weights is a model
of the same size and cost as each, which often generalises like their ensemble. Every
weight is averaged, BatchNorm's moving statistics included; the members must share the
architecture and the holdout (a member must not have trained on an image another one is
scored on). The soup folder is a run folder (``config.yaml``, ``splits.csv``,
``model.keras``), so ``evaluate``, ``quantize`` and ``export_app`` take it; ``soup.json``
names the members (folder names and checksums, no machine path). Its validation split is
the first member's: if the members' validation splits differ, the others trained on part
of it, so the threshold and calibration fitted there are optimistic, and ``soup.json``
says so.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from melanoma_tf import config as cfgmod
from melanoma_tf import data as datamod
from melanoma_tf import models
from melanoma_tf.cli import run_main
from melanoma_tf.evaluation import evaluate
from melanoma_tf.files import write_json
from melanoma_tf.runs import RunError, resolve_stage_dir

log = logging.getLogger(__name__)


def _split_ids(stage_dir: Path, split: str) -> frozenset:
    manifest = datamod.read_split_manifest(stage_dir / "splits.csv")
    return frozenset(manifest.loc[manifest["split"] == split, "image_id"])


def make_soup(run_dirs: Sequence[str | Path], out: str | Path,
              coefficients: Optional[Sequence[float]] = None) -> Path:
    """Averages the members' weights into ``out`` (a run folder); returns it.

    Args:
      run_dirs: two or more trained runs (or chained runs: their last stage).
      out: the soup's folder (created; an existing soup there is replaced).
      coefficients: one non-negative weight per member, normalised to sum 1; default uniform.

    Raises:
      RunError: fewer than two members, other architectures, other holdouts, bad coefficients (naming the run).
    """
    if len(run_dirs) < 2:
        raise RunError("--runs: a soup needs at least two runs")
    stage_dirs = [resolve_stage_dir(r) for r in run_dirs]
    if coefficients is None:
        coefficients = [1.0] * len(stage_dirs)
    coefficients = np.asarray(coefficients, dtype=np.float64)
    if len(coefficients) != len(stage_dirs) or not np.all(np.isfinite(coefficients)) or (coefficients < 0).any() \
            or coefficients.sum() <= 0:
        raise RunError(f"--coefficients: need {len(stage_dirs)} non-negative numbers, not all 0 "
                       f"(got {coefficients.tolist()})")
    coefficients = coefficients / coefficients.sum()
    first = models.load_model(stage_dirs[0] / "model.keras")
    layout = [(v.name, tuple(v.shape)) for v in first.weights]
    holdout = _split_ids(stage_dirs[0], "holdout")
    validation = _split_ids(stage_dirs[0], "val")
    members, totals = [], [np.zeros(v.shape, np.float64) for v in first.weights]
    same_validation = True
    for stage_dir, c in zip(stage_dirs, coefficients):
        model = first if stage_dir == stage_dirs[0] else models.load_model(stage_dir / "model.keras")
        if [(v.name, tuple(v.shape)) for v in model.weights] != layout:
            raise RunError(f"--runs {stage_dir}: another architecture than {stage_dirs[0]} (its weights differ in "
                           "names or shapes): only models of one architecture make a soup")
        if _split_ids(stage_dir, "holdout") != holdout:
            raise RunError(f"--runs {stage_dir}: another holdout than {stage_dirs[0]}: a member would have trained "
                           "on images the soup is scored on")
        same_validation &= _split_ids(stage_dir, "val") == validation
        for total, value in zip(totals, model.get_weights()):
            total += c * value
        digest = hashlib.sha256((stage_dir / "model.keras").read_bytes()).hexdigest()
        members.append({"run": stage_dir.name if stage_dir.name not in cfgmod.STAGES
                        else f"{stage_dir.parent.name}/{stage_dir.name}", "model_sha256": digest,
                        "coefficient": float(c)})
    dtypes = [w.dtype for w in first.get_weights()]
    first.set_weights([t.astype(d) if np.issubdtype(d, np.floating) else w
                       for t, d, w in zip(totals, dtypes, first.get_weights())])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("eval_holdout", "eval_val", "tflite"):  # scores of a soup that was there before
        shutil.rmtree(out / stale, ignore_errors=True)
    shutil.copyfile(stage_dirs[0] / "config.yaml", out / "config.yaml")
    shutil.copyfile(stage_dirs[0] / "splits.csv", out / "splits.csv")
    models.save_model(first, out / "model.keras")
    write_json(out / "soup.json", {
        "members": members,
        "validation": ("shared by every member" if same_validation else
                       f"{members[0]['run']}'s; the other members trained on part of it, so a threshold or "
                       "calibration fitted on it is optimistic (the holdout is every member's)"),
    })
    log.info("soup of %d runs -> %s", len(members), out)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="two or more trained runs of one architecture")
    parser.add_argument("--out", required=True, help="the soup's run folder")
    parser.add_argument("--coefficients", help="comma-separated weights, one per run (default: uniform)")
    parser.add_argument("--evaluate", action="store_true", help="then score it on the holdout and external sets")
    args = parser.parse_args(argv)

    def go() -> str:
        coefficients = None
        if args.coefficients:
            try:
                coefficients = [float(x) for x in args.coefficients.split(",")]
            except ValueError:
                raise RunError(f"--coefficients {args.coefficients}: not a comma-separated list of numbers") from None
        out = make_soup(args.runs, args.out, coefficients)
        if args.evaluate:
            return f"soup: {out}; report: {evaluate(str(out))}"
        return f"soup: {out}"

    return run_main(go)


if __name__ == "__main__":
    raise SystemExit(main())
