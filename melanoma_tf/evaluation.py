"""Scoring a model on a split: the clinical report, calibration, external sets, cost.

:func:`evaluate` is what ``python -m melanoma_tf.evaluate`` runs, and what quantization
and the baselines score with. The operating point is the threshold reaching the target
sensitivity (0.95 by default) on the run's *validation* split, applied unchanged to the
split being reported; temperature scaling, Platt calibration and the referral band are
fitted on validation too. A ``.tflite`` with a sidecar JSON can be scored without a run
on external images, taking its preprocessing, threshold and calibration from the sidecar.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from melanoma_tf import config as cfgmod
from melanoma_tf import cost, plots, report
from melanoma_tf import data as datamod
from melanoma_tf import metrics as M
from melanoma_tf.errors import MelanomaTfError
from melanoma_tf.explain import gradcam_gallery, has_feature_map, relation_analysis
from melanoma_tf.files import write_atomic, write_json
from melanoma_tf.models import load_model
from melanoma_tf.pipeline import load_images
from melanoma_tf.runs import read_out_of_fold, resolve_stage_dir, split_frame
from melanoma_tf.tflite import TFLiteModel, read_sidecar

log = logging.getLogger("melanoma_tf.evaluate")


class EvaluationError(MelanomaTfError, ValueError):
    """The run, model or data given to evaluate cannot be used; the message names it."""


# --------------------------------------------------------------------------- inputs


def external_frame(images_dir: str | Path, labels_csv: str | Path, label_mode: str = "binary",
                   on_corrupt: str = "error") -> pd.DataFrame:
    """An external test set: a folder of images and a CSV ``image_id,label`` (0/1 for binary).

    Optional columns (lesion_id, sex, age, localization, dataset) are kept for the
    bootstrap and the subgroup audit; without lesion_id (or with a blank one) each image
    is its own lesion. Every file is decoded once before scoring, with the training
    decoder: one that does not decode is an error naming it (``on_corrupt="error"``) or
    is left out (``"skip"``), its id in ``frame.attrs["skipped_unreadable"]``.
    """
    labels_csv = Path(labels_csv)
    if not labels_csv.is_file():
        raise EvaluationError(f"--labels {labels_csv}: file not found")
    try:
        table = datamod.read_csv_table(labels_csv, dtype={"image_id": str})
    except datamod.DataError as err:
        raise EvaluationError(str(err)) from None
    table.columns = [str(c).strip() for c in table.columns]
    for column in ("image_id", "label"):
        if column not in table.columns:
            raise EvaluationError(f"{labels_csv}: missing column {column!r} (expected image_id,label)")
    table["image_id"] = table["image_id"].map(datamod._strip_suffix)
    labels = pd.to_numeric(table["label"], errors="coerce")
    allowed = {0, 1} if label_mode == "binary" else set(range(len(datamod.DX_CLASSES)))
    bad = ~labels.isin(allowed)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise EvaluationError(f"{labels_csv}: row {row + 2}: label '{table['label'].iloc[row]}' is not one of "
                              f"{sorted(allowed)}")
    table["label"] = labels.astype(int)
    files = datamod.find_images(images_dir)
    missing = [i for i in table["image_id"] if i not in files]
    if missing:
        raise EvaluationError(f"{len(missing)} images listed in {labels_csv} are not in {images_dir} "
                              f"(first: {missing[0]})")
    table["path"] = [str(files[i]) for i in table["image_id"]]
    if "lesion_id" not in table.columns:
        table["lesion_id"] = table["image_id"]
    try:
        table, skipped = datamod.drop_unreadable(table, on_corrupt, f" listed in {labels_csv}",
                                                 "--on-corrupt skip (data.on_corrupt: skip) scores the rest")
    except datamod.DataError as err:
        raise EvaluationError(str(err)) from None
    if table.empty:
        raise EvaluationError(f"{labels_csv}: no image left to score once unreadable files are skipped")
    table.attrs["skipped_unreadable"] = skipped
    return table


@dataclass
class LoadedModel:
    """A Keras model or a TFLite flatbuffer behind one ``logits(images)`` call."""

    path: Path
    keras_model: object = None
    tflite_model: object = None

    @property
    def input_size(self) -> int:
        if self.keras_model is not None:
            return int(self.keras_model.input_shape[1])
        return int(self.tflite_model.input_shape[1])

    @property
    def num_outputs(self) -> int:
        if self.keras_model is not None:
            return int(self.keras_model.output_shape[-1])
        return int(self.tflite_model.interpreter.get_output_details()[0]["shape"][-1])

    def logits(self, images: np.ndarray) -> np.ndarray:
        if self.keras_model is not None:
            return np.asarray(self.keras_model.predict(images, batch_size=32, verbose=0), dtype=np.float64)
        return np.asarray(self.tflite_model.predict(images), dtype=np.float64)


def load_any_model(path: str | Path, threads: int = 1) -> LoadedModel:
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"--model {path}: file not found")
    if path.suffix == ".tflite":
        try:
            return LoadedModel(path, tflite_model=TFLiteModel(path, threads=threads))
        except ValueError as err:
            raise EvaluationError(f"--model {path}: not a valid TFLite flatbuffer: {err}") from None
    if path.suffix == ".keras":
        try:
            return LoadedModel(path, keras_model=load_model(path))
        except (ValueError, OSError) as err:
            raise EvaluationError(f"--model {path}: cannot load Keras model: {err}") from None
    raise EvaluationError(f"--model {path}: expected a .keras or .tflite file")


# --------------------------------------------------------------------------- scoring


def melanoma_logit(logits: np.ndarray, labels: str) -> np.ndarray:
    """One melanoma score per image: the logit (binary), or logit of P(mel) (multiclass)."""
    if labels == "binary":
        return logits.reshape(-1)
    p_mel = M.softmax(logits)[:, datamod.DX_CLASSES.index(datamod.MELANOMA)]
    return M.logit(p_mel)


def binary_report(val_y, val_z, test_y, test_z, test_groups, *, target_sensitivity: float = 0.95,
                  refer_fraction: float = 0.1, n_boot: int = 1000, seed: int = 0,
                  threshold: Optional[float] = None, temperature: Optional[float] = None,
                  refer_margin: Optional[float] = None, platt: Optional[tuple[float, float]] = None) -> dict:
    """All binary metrics of one model on a test set, with every choice made on validation.

    Args:
      val_y, val_z: validation labels (0/1) and melanoma logits; may be None when
        threshold, temperature and refer_margin are all given (a sidecar).
      test_y, test_z: the reported data's labels and melanoma logits.
      test_groups: lesion ids for the bootstrap.
      target_sensitivity: the validation sensitivity the threshold must reach.
      refer_fraction: share of validation images inside the referral band.
      threshold: a fixed probability threshold instead of choosing one.
      platt: a fixed Platt calibration ``(a, b)`` (a sidecar's) instead of fitting one on validation.

    Returns:
      A dict with the ``metrics.json`` keys.
    """
    test_y = np.asarray(test_y).reshape(-1)
    test_z = np.asarray(test_z, dtype=np.float64).reshape(-1)
    p = M.sigmoid(test_z)
    if threshold is None:
        threshold = M.threshold_for_sensitivity(val_y, M.sigmoid(val_z), target_sensitivity)
    if temperature is None:
        temperature = M.fit_temperature(val_z, val_y)
    threshold_logit = float(M.logit(threshold))
    if refer_margin is None:
        refer_margin = M.refer_margin(np.asarray(val_z) / temperature, threshold_logit / temperature,
                                      refer_fraction) if val_z is not None else 0.0
    out = {"n_images": int(len(test_y)), "n_melanoma": int(test_y.sum()),
           "target_sensitivity": target_sensitivity}
    out["roc_auc"] = M.roc_auc(test_y, p)
    out["pr_auc"] = M.pr_auc(test_y, p)
    out["bootstrap_grouping"] = M.bootstrap_groups(test_groups)[1]
    out["roc_auc_ci"] = list(M.bootstrap_ci(test_y, p, test_groups, M.roc_auc, n_boot, seed))
    out["pr_auc_ci"] = list(M.bootstrap_ci(test_y, p, test_groups, M.pr_auc, n_boot, seed))
    rates = M.rates_at(test_y, p, threshold)
    out.update(rates)
    p_cal = M.sigmoid(test_z / temperature)
    out.update({"temperature": temperature, "ece": M.ece(test_y, p), "ece_calibrated": M.ece(test_y, p_cal),
                "brier": M.brier(test_y, p), "brier_calibrated": M.brier(test_y, p_cal)})
    if platt is None and val_z is not None:
        platt = M.fit_platt(val_z, val_y)
    if platt is not None:
        a, b = platt
        out.update({"platt": [float(a), float(b)], "ece_platt": M.ece(test_y, M.sigmoid(a * test_z + b))})
    out.update(M.refer_summary(test_y, test_z / temperature, threshold_logit / temperature, refer_margin))
    if val_z is not None:
        out["val_sensitivity"] = M.rates_at(val_y, M.sigmoid(val_z), threshold)["sensitivity"]
    return out


def _predict(model: LoadedModel, frame: pd.DataFrame) -> np.ndarray:
    return model.logits(load_images(frame["path"].tolist(), model.input_size))


def _validation(cfg, stage_dir: Optional[Path], model: LoadedModel,
                label_mode: str) -> tuple[Optional[np.ndarray], Optional[np.ndarray], bool]:
    """The melanoma logits and labels the operating point is fitted on, and whether they are out of fold.

    A run's validation split, scored by ``model``; for a cross-fitted run (no validation split left), the fold
    models' out-of-fold logits (``oof_logits.csv``, melanoma_tf.crossfit); nothing without a run.
    """
    if cfg is None:
        return None, None, False
    out_of_fold = read_out_of_fold(stage_dir)
    if out_of_fold is not None:
        return out_of_fold["logit"].to_numpy(np.float64), out_of_fold["melanoma"].to_numpy(), True
    val = split_frame(cfg, stage_dir, "val")
    return melanoma_logit(_predict(model, val), label_mode), _melanoma_labels(val, label_mode), False


def evaluate(run_dir: Optional[str] = None, model_path: Optional[str] = None, split: str = "holdout",
             images: Optional[str] = None, labels: Optional[str] = None, out: Optional[str] = None,
             target_sensitivity: float = 0.95, refer_fraction: float = 0.1, n_boot: int = 1000,
             gradcam: int = 4, latency_runs: int = 50, seed: int = 0, relation: bool = True,
             external: bool = True, melanoma_labels: bool = False, on_corrupt: Optional[str] = None) -> Path:
    """Scores a model and writes predictions, metrics, plots and report.md; returns report.md's path.

    ``relation``: for a Keras model, also the feature-relation analysis (Rd and
    the relation matrix plot). ``external``: when scoring a run's split (the holdout,
    or validation in a sweep), also score the run's external test sets (``data.external``) with the same
    validation-chosen threshold, each in ``<out>/external/<name>/``, and put them
    beside the holdout in the report; a set that fails is reported as failed, with the
    reason, and never costs the run its holdout report. ``melanoma_labels``: the
    ``--labels`` CSV says melanoma (1) or not (0) even for a multiclass model (external
    sets are labelled so). ``on_corrupt``: ``error`` or ``skip`` for ``--images`` files
    that do not decode (default: the run's ``data.on_corrupt``, else ``error``).
    """
    stage_dir, cfg, sidecar, model_file = _resolve_inputs(run_dir, model_path, images, labels)
    label_mode = cfg.data.labels if cfg else sidecar.get("labels", "binary")
    model = load_any_model(model_file)
    tag = "external" if images else split
    out_dir = Path(out) if out else (stage_dir or model_file.parent) / (
        f"eval_{tag}" if model_file.name == "model.keras" else f"eval_{tag}_{model_file.stem}")
    out_dir.mkdir(parents=True, exist_ok=True)

    test_mode = "binary" if melanoma_labels else label_mode
    on_corrupt = on_corrupt or (cfg.data.on_corrupt if cfg is not None else "error")
    test = (external_frame(images, labels, test_mode, on_corrupt) if images
            else split_frame(cfg, stage_dir, split))
    test_images = load_images(test["path"].tolist(), model.input_size)  # decoded once, used twice
    test_logits = model.logits(test_images)
    val_z, val_y, out_of_fold = _validation(cfg, stage_dir, model, label_mode)
    fixed = _sidecar_operating_point(sidecar) if sidecar is not None and cfg is None else {}
    test_z, test_y = melanoma_logit(test_logits, label_mode), _melanoma_labels(test, test_mode)
    result = binary_report(val_y, val_z, test_y, test_z, test["lesion_id"].to_numpy(),
                           target_sensitivity=target_sensitivity, refer_fraction=refer_fraction,
                           n_boot=n_boot, seed=seed, **fixed)
    skipped = test.attrs.get("skipped_unreadable", [])
    result.update({"n_skipped_unreadable": len(skipped), "skipped_unreadable": skipped[:20]})
    result["threshold_source"] = ("sidecar" if fixed else "out-of-fold predictions (cross-fit)"
                                  if out_of_fold else
                                  "validation (same data as reported: optimistic)" if tag == "val"
                                  else "validation")
    if test_mode == "multiclass":
        result["multiclass"] = M.multiclass_report(test["label"].to_numpy(), M.softmax(test_logits),
                                                   list(datamod.DX_CLASSES))
    reference = _reference_keras(stage_dir) if model.keras_model is None and cfg is not None else None
    result.update(cost.model_cost(model_file, keras_model=model.keras_model, runs=latency_runs,
                                  reference_keras=reference))
    result.update({"model": str(model_file), "split": tag, "run": str(stage_dir) if stage_dir else None,
                   "model_name": _model_name(stage_dir, model_file),
                   # which file these numbers are of: export_app refuses to show them beside another model
                   "model_sha256": hashlib.sha256(Path(model_file).read_bytes()).hexdigest()})

    predictions, figures = write_scored_split(out_dir, test, test_z, test_y, result,
                                              cfg.data.source_column if cfg is not None else "dataset",
                                              M.softmax(test_logits) if label_mode == "multiclass" else None)
    gallery = []
    if model.keras_model is not None:
        names = list(datamod.DX_CLASSES) if label_mode == "multiclass" else ["not melanoma", "melanoma"]
        gallery = _explanations(model.keras_model, test, test_images, test_y, predictions, result, figures, out_dir,
                                gradcam, relation and "head_dropout" in [layer.name for layer in
                                                                         model.keras_model.layers], names, seed)
    if external and cfg is not None and images is None:  # beside the holdout, or the validation split of a sweep
        result["external"] = {ext.name: _score_external_set(
            ext, out_dir / "external" / ext.name, run_dir=run_dir, model_path=model_path,
            target_sensitivity=target_sensitivity, refer_fraction=refer_fraction, n_boot=n_boot, seed=seed,
            on_corrupt=cfg.data.on_corrupt)
            for ext in cfg.data.external}
    if cfg is not None:
        cfgmod.save(cfg, out_dir / "config.yaml")  # the run's resolved config, beside what it produced
    write_json(out_dir / "evaluation.json", {
        "run": str(stage_dir) if stage_dir else None, "model": str(model_file), "split": tag,
        "images": images, "labels": labels, "target_sensitivity": target_sensitivity,
        "refer_fraction": refer_fraction, "bootstrap": n_boot, "seed": seed, "sidecar": sidecar})
    write_json(out_dir / "metrics.json", result)
    return report.write_report(out_dir, result, figures, gallery)


def write_scored_split(out_dir: Path, test: pd.DataFrame, test_z: np.ndarray, test_y: np.ndarray,
                       result: dict, source_column: str = "dataset",
                       class_probabilities: Optional[np.ndarray] = None) -> tuple[pd.DataFrame, dict]:
    """What every scored model writes beside its metrics: ``predictions.csv`` (probability, calibrated
    probability, call, referral; for a multiclass model given ``class_probabilities``, also the arg-max
    ``predicted_class`` and one ``p_<class>`` column per HAM10000 diagnosis), the subgroup audit (into
    ``result``; per clinic by ``source_column`` too) and the figures; returns both."""
    predictions = _predictions(test, test_z, result)
    if class_probabilities is not None:
        predictions["predicted_class"] = np.asarray(datamod.DX_CLASSES)[np.argmax(class_probabilities, axis=1)]
        for k, name in enumerate(datamod.DX_CLASSES):
            predictions[f"p_{name}"] = class_probabilities[:, k]
    write_atomic(out_dir / "predictions.csv", predictions.to_csv(index=False))
    audit_frame = test.assign(prob=M.sigmoid(test_z), label=test_y)
    if "age" in audit_frame.columns:
        audit_frame["age_band"] = audit_frame["age"].map(M.age_band)
    columns = ("sex", "age_band", "localization", *dict.fromkeys(("dataset", source_column)))
    result["subgroups"] = M.subgroup_audit(audit_frame, result["threshold"], columns=columns)
    return predictions, _figures(out_dir, test_y, predictions, result)


def _sidecar_operating_point(sidecar: dict) -> dict:
    """Threshold, temperature, referral margin and Platt calibration as a sidecar stores them."""
    calibration = sidecar.get("calibration") or {}
    return {"threshold": sidecar["threshold"], "temperature": sidecar.get("temperature", 1.0),
            "refer_margin": sidecar.get("refer_margin_logit", 0.0),
            "platt": (calibration["a"], calibration["b"]) if calibration.get("method") == "platt" else None}


def _melanoma_labels(frame: pd.DataFrame, label_mode: str) -> np.ndarray:
    """1 for melanoma, 0 otherwise (a multiclass frame's ``mel`` class)."""
    labels = frame["label"].to_numpy()
    return (labels == datamod.DX_CLASSES.index("mel")).astype(int) if label_mode == "multiclass" else labels


def _figures(out_dir: Path, test_y: np.ndarray, predictions: pd.DataFrame, result: dict) -> dict:
    figures = plots.binary_figures(out_dir, test_y, predictions["probability"].to_numpy(),
                                   predictions["calibrated_probability"].to_numpy(), result["threshold"],
                                   "Platt-calibrated" if result.get("platt") else "temperature-scaled")
    if "multiclass" in result:
        figures["confusion_multiclass"] = plots.confusion_matrix_plot(
            out_dir / "confusion_multiclass.png", np.array(result["multiclass"]["confusion_matrix"]),
            list(datamod.DX_CLASSES))
    return figures


def _resolve_inputs(run_dir, model_path, images, labels):
    """The run's stage folder and config (or None), the sidecar of a .tflite (or None), and the model file."""
    if (images is None) != (labels is None):
        raise EvaluationError("--images and --labels go together")
    sidecar = read_sidecar(model_path) if model_path and model_path.endswith(".tflite") else None
    if run_dir is None and sidecar is None:
        raise EvaluationError("--run is needed unless --model is a .tflite with its sidecar JSON")
    if run_dir is None and images is None:
        raise EvaluationError("without --run, give the data to score with --images and --labels")
    stage_dir = resolve_stage_dir(run_dir) if run_dir else None
    cfg = cfgmod.load(stage_dir / "config.yaml") if stage_dir else None
    model_file = Path(model_path) if model_path else stage_dir / "model.keras"
    return stage_dir, cfg, sidecar, model_file


def _predictions(test: pd.DataFrame, test_z: np.ndarray, result: dict) -> pd.DataFrame:
    """One row per image: the raw and the calibrated probability, the call at the threshold, the referral."""
    predictions = test[["image_id", "lesion_id", "label"]].copy()
    predictions["probability"] = M.sigmoid(test_z)
    predictions["logit"] = test_z
    # The probability a user is shown: the validation-fitted Platt calibration (the sidecar's), else the temperature.
    a, b = result.get("platt") or (1.0 / result["temperature"], 0.0)
    predictions["calibrated_probability"] = M.sigmoid(a * test_z + b)
    predictions["called_melanoma"] = predictions["probability"] >= result["threshold"]
    distance = np.abs(test_z / result["temperature"] - M.logit(result["threshold"]) / result["temperature"])
    predictions["uncertainty_margin"] = distance
    predictions["refer"] = distance < result["refer_margin_logit"]
    return predictions



def _explanations(keras_model, test: pd.DataFrame, test_images: np.ndarray, test_y: np.ndarray,
                  predictions: pd.DataFrame, result: dict, figures: dict, out_dir: Path, gradcam: int,
                  relation: bool, names: list[str], seed: int) -> list:
    """Grad-CAM of the worst misses and false alarms, and the relation analysis (into ``result`` / ``figures``)."""
    gallery = []
    if gradcam and not has_feature_map(keras_model):
        log.info("no Grad-CAM for %s: it has no feature map of its own (an ensemble's are in its members)",
                 keras_model.name)
    elif gradcam:
        gallery = gradcam_gallery(keras_model, test, predictions["probability"].to_numpy(), test_y,
                                  result["threshold"], out_dir / "gradcam", per_kind=gradcam)
    if relation:
        result["relation"], figures["relation_matrix"] = relation_analysis(
            keras_model, test_images, test["label"].to_numpy(), names, out_dir / "relation_matrix.png", seed)
    return gallery


# What the holdout report and the comparisons carry of each external evaluation.
EXTERNAL_KEYS = ("roc_auc", "roc_auc_ci", "pr_auc", "pr_auc_ci", "sensitivity", "specificity", "ppv", "npv", "f1",
                 "ece", "ece_calibrated", "ece_platt", "n_images", "n_melanoma", "n_skipped_unreadable")


def _score_external_set(ext, out_dir: Path, **kwargs) -> dict:
    """Scores one configured external set; a set whose files are absent is skipped with the reason."""
    images, labels = Path(ext.images).expanduser(), Path(ext.labels).expanduser()
    missing = [str(p) for p in (images, labels) if not p.exists()]
    if missing:
        if ext.required:
            raise EvaluationError(f"data.external {ext.name!r}: not found: {', '.join(missing)}")
        log.info("external set %s skipped: %s not found", ext.name, ", ".join(missing))
        return {"skipped": f"not found: {', '.join(Path(m).name for m in missing)}"}
    log.info("scoring external set %s (%s)", ext.name, images)
    try:
        evaluate(images=str(images), labels=str(labels), out=str(out_dir), gradcam=0, latency_runs=5,
                 relation=False, external=False, melanoma_labels=True, **kwargs)
    except MelanomaTfError as err:  # the holdout report is written all the same, with the reason
        if ext.required:
            raise
        log.error("external set %s not scored: %s", ext.name, err)
        return {"failed": str(err)}
    metrics = json.loads((out_dir / "metrics.json").read_text())
    return {"folder": f"external/{ext.name}", **{k: metrics.get(k) for k in EXTERNAL_KEYS}}


def _reference_keras(stage_dir: Path):
    """The run's Keras model, whose params and MACs a .tflite of it reports (loaded once per file version)."""
    path = stage_dir / "model.keras"
    if not path.is_file():
        return None
    stat = path.stat()
    return _load_reference(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _load_reference(path: str, mtime_ns: int, size: int):
    """Loads a model.keras; the file's mtime and size in the key make a rewritten file load again."""
    del mtime_ns, size
    return load_model(path)


def _model_name(stage_dir: Optional[Path], model_file: Path) -> str:
    base = stage_dir.name if stage_dir else model_file.parent.name
    return base if model_file.name == "model.keras" else f"{base}/{model_file.stem}"
