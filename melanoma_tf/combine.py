"""Runs combined into one model: their weights averaged (a soup) or their logits averaged (an ensemble).

The library behind ``python -m melanoma_tf.soup`` (see there) and ``python -m melanoma_tf.crossfit``. The
result is a run folder (``config.yaml``, ``splits.csv``, ``model.keras``, ``soup.json``) that ``evaluate``,
``quantize`` and ``export_app`` take.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from melanoma_tf import config as cfgmod
from melanoma_tf import data as datamod
from melanoma_tf import models
from melanoma_tf.backend import keras
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
    totals = [np.zeros(v.shape, np.float64) for v in first.weights]
    for stage_dir, c in zip(stage_dirs, coefficients):
        model = first if stage_dir == stage_dirs[0] else models.load_model(stage_dir / "model.keras")
        if [(v.name, tuple(v.shape)) for v in model.weights] != layout:
            raise RunError(f"--runs {stage_dir}: another architecture than {stage_dirs[0]} (its weights differ in "
                           "names or shapes): only models of one architecture make a soup")
        for total, value in zip(totals, model.get_weights()):
            total += c * value
    members = _members(stage_dirs, coefficients, "soup")
    dtypes = [w.dtype for w in first.get_weights()]
    first.set_weights([t.astype(d) if np.issubdtype(d, np.floating) else w
                       for t, d, w in zip(totals, dtypes, first.get_weights())])
    return _write_run(out, stage_dirs, first, members, "soup")


def mean_logit_model(members: Sequence) -> "keras.Model":
    """One Keras model whose output is the mean of the members' outputs (logits) for the same image."""
    for i, model in enumerate(members):
        model._name = f"member_{i}"  # unique layer names inside the ensemble
    image = keras.Input(members[0].input_shape[1:], name="image")
    logits = keras.layers.Average(name="ensemble_mean")([m(image, training=False) for m in members])
    return keras.Model(image, logits, name="ensemble")


def make_ensemble(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """The mean-logit ensemble of the members as one model in ``out`` (a run folder); returns it.

    Raises:
      RunError: fewer than two members, other input sizes or outputs, other holdouts (naming the run).
    """
    if len(run_dirs) < 2:
        raise RunError("--runs: an ensemble needs at least two runs")
    stage_dirs = [resolve_stage_dir(r) for r in run_dirs]
    members = []
    for i, stage_dir in enumerate(stage_dirs):
        model = models.load_model(stage_dir / "model.keras")
        if members and (model.input_shape, model.output_shape) != (members[0].input_shape, members[0].output_shape):
            raise RunError(f"--runs {stage_dir}: input {model.input_shape} and output {model.output_shape}, "
                           f"{stage_dirs[0]} has {members[0].input_shape} and {members[0].output_shape}: an "
                           "ensemble's members take one image size and give one kind of output")
        members.append(model)
    ensemble = mean_logit_model(members)
    record = _members(stage_dirs, np.full(len(stage_dirs), 1.0 / len(stage_dirs)), "ensemble")
    return _write_run(out, stage_dirs, ensemble, record, "ensemble")


def _members(stage_dirs: list[Path], coefficients: np.ndarray, kind: str) -> dict:
    """``soup.json``'s record: each member's run name, checksum and coefficient, and whose validation split it is.

    Raises:
      RunError: a member with another holdout (it would have trained on images the result is scored on).
    """
    holdout = _split_ids(stage_dirs[0], "holdout")
    validation = _split_ids(stage_dirs[0], "val")
    members, same_validation = [], True
    for stage_dir, c in zip(stage_dirs, coefficients):
        if _split_ids(stage_dir, "holdout") != holdout:
            raise RunError(f"--runs {stage_dir}: another holdout than {stage_dirs[0]}: a member would have trained "
                           f"on images the {kind} is scored on")
        same_validation &= _split_ids(stage_dir, "val") == validation
        digest = hashlib.sha256((stage_dir / "model.keras").read_bytes()).hexdigest()
        members.append({"run": stage_dir.name if stage_dir.name not in cfgmod.STAGES
                        else f"{stage_dir.parent.name}/{stage_dir.name}", "model_sha256": digest,
                        "coefficient": float(c)})
    return {"kind": kind, "members": members,
            "validation": ("shared by every member" if same_validation else
                           f"{members[0]['run']}'s; the other members trained on part of it, so a threshold or "
                           "calibration fitted on it is optimistic (the holdout is every member's)")}


def _write_run(out: str | Path, stage_dirs: list[Path], model, record: dict, kind: str) -> Path:
    """``out`` as a run folder: the first member's config and split, ``model``, ``soup.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("eval_holdout", "eval_val", "tflite"):  # scores of a model that was there before
        shutil.rmtree(out / stale, ignore_errors=True)
    shutil.copyfile(stage_dirs[0] / "config.yaml", out / "config.yaml")
    shutil.copyfile(stage_dirs[0] / "splits.csv", out / "splits.csv")
    models.save_model(model, out / "model.keras")
    write_json(out / "soup.json", record)
    log.info("%s of %d runs -> %s", kind, len(stage_dirs), out)
    return out
