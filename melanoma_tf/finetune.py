"""Robust fine-tuning: LP-FT's linear-probe start and WiSE-FT's weight interpolation.

- **LP-FT** (Kumar et al., ICLR 2022): fine-tuning a pretrained network from a random head
  distorts the features it starts from, and loses most out of distribution. With
  ``train.linear_probe`` the logit layer is first fitted to completion on the frozen start
  model's features (:func:`linear_probe`), then every layer trains as configured.
- **WiSE-FT** (Wortsman et al., CVPR 2022): the weights of that start and of the fine-tuned
  model, interpolated (:func:`interpolate_weights`, ``train.wise_ft``), often keep the start's
  robustness and most of the fine-tune's accuracy. The start is kept as a run folder
  (``<stage>/start/``), so ``python -m melanoma_tf.soup`` with coefficients ``1 - w, w``, or
  ``tools/wise_ft_yardstick.py`` over a yardstick, gives any other ``w`` after training.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from melanoma_tf import metrics as M
from melanoma_tf import models
from melanoma_tf.backend import keras
from melanoma_tf.config import Config
from melanoma_tf.data import PreparedData
from melanoma_tf.errors import MelanomaTfError
from melanoma_tf.pipeline import make_dataset

log = logging.getLogger("melanoma_tf.train")
C_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # inverse L2 strengths, on standardised features
START = "start"  # the stage's sub-folder holding the linear-probe start (a run folder)


class FineTuneError(MelanomaTfError, ValueError):
    """The start and the fine-tuned model cannot be interpolated; the message names the files."""


def fit_linear_head(x_train, y_train, x_val, y_val, balanced: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """A logistic regression on standardised features, C chosen on validation; weights on the raw features.

    Binary labels give one output (the melanoma logit), ``K`` classes ``K`` outputs (multinomial).
    Validation is scored by ROC-AUC (binary) or balanced accuracy (multi-class).

    Returns:
      ``(kernel (features, outputs), bias (outputs,), {"C", "val_score_by_C"})``.
    """
    scaler = StandardScaler().fit(x_train)
    xt, xv = scaler.transform(x_train), scaler.transform(x_val)
    binary = len(np.unique(np.concatenate([y_train, y_val]))) <= 2 and set(np.unique(y_train)) <= {0, 1}
    scores, fitted = {}, {}
    for c in C_GRID:
        head = LogisticRegression(C=c, class_weight="balanced" if balanced else None, max_iter=5000).fit(xt, y_train)
        if binary:
            scores[c] = M.roc_auc(y_val, head.decision_function(xv))
        else:
            predicted = head.predict(xv)
            scores[c] = float(np.mean([np.mean(predicted[y_val == k] == k) for k in np.unique(y_val)]))
        fitted[c] = head
    best = max(scores, key=lambda c: (np.nan_to_num(scores[c], nan=-1.0), -c))
    head = fitted[best]
    coef = head.coef_ / scaler.scale_  # (outputs, features) on raw features
    bias = head.intercept_ - coef @ scaler.mean_
    return coef.T.astype(np.float32), bias.astype(np.float32), {"C": best, "val_score_by_C": {
        str(k): (None if not np.isfinite(v) else float(v)) for k, v in scores.items()}}


def head_features(model: keras.Model, paths: list[str], image_size: int, batch_size: int = 64) -> np.ndarray:
    """What ``model``'s logit layer sees for each image (inference mode: no dropout), unaugmented."""
    features = keras.Model(model.input, model.get_layer("logits").input)
    ds = make_dataset(paths, np.zeros(len(paths), np.float32), image_size, batch_size, binary=True,
                      cache="none").map(lambda x, y, w: x)
    return features.predict(ds, verbose=0).astype(np.float32)


def linear_probe(model: keras.Model, cfg: Config, data: PreparedData) -> dict:
    """Fits ``model``'s logit layer on its frozen features of the training split (C on validation); returns how."""
    train, val = data.part("train"), data.part("val")
    size = cfg.data.image_size
    x_train = head_features(model, train["path"].tolist(), size)
    x_val = head_features(model, val["path"].tolist(), size)
    kernel, bias, choice = fit_linear_head(x_train, train["label"].to_numpy(), x_val, val["label"].to_numpy(),
                                           balanced=cfg.data.class_weight == "balanced")
    layer = model.get_layer("logits")
    if tuple(layer.kernel.shape) != kernel.shape:
        raise FineTuneError(f"train.linear_probe: the logit layer is {tuple(layer.kernel.shape)}, the probe "
                            f"{kernel.shape} (labels other than the model's outputs?)")
    layer.set_weights([kernel, bias])
    score = choice["val_score_by_C"][str(choice["C"])]
    log.info("linear probe: logit layer fitted on %d training images' features (C=%g, validation %s)",
             len(train), choice["C"], "n/a" if score is None else f"{score:.3f}")
    return {"C": choice["C"], "val_score": score, "n_train": int(len(train))}


def save_start(model: keras.Model, stage_dir: Path) -> Path:
    """The start as a run folder ``<stage>/start`` (model, config, splits): a soup member, an evaluable run."""
    folder = stage_dir / START
    folder.mkdir(parents=True, exist_ok=True)
    models.save_model(model, folder / "model.keras")
    for name in ("config.yaml", "splits.csv"):
        shutil.copyfile(stage_dir / name, folder / name)
    return folder


def interpolate_weights(model: keras.Model, start_file: Path, weight: float) -> None:
    """Sets ``model``'s weights to ``(1 - weight) x start + weight x its own``, every floating weight."""
    start = models.load_model(start_file)
    if [(v.name, tuple(v.shape)) for v in start.weights] != [(v.name, tuple(v.shape)) for v in model.weights]:
        raise FineTuneError(f"{start_file}: another architecture than the model trained (train.wise_ft "
                            "interpolates the same network's start and end)")
    mixed = [((1.0 - weight) * s + weight * f).astype(f.dtype) if np.issubdtype(f.dtype, np.floating) else f
             for s, f in zip(start.get_weights(), model.get_weights())]
    model.set_weights(mixed)
    log.info("WiSE-FT: the model is %.2f x the linear-probe start + %.2f x the fine-tuned weights",
             1.0 - weight, weight)
