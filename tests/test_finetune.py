"""Robust fine-tuning: LP-FT's fitted head, WiSE-FT's interpolation, both in training, and w chosen on the yardstick."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from conftest import REPO, tiny_overrides
from melanoma_tf import config as cfgmod
from melanoma_tf import finetune as F
from melanoma_tf import metrics as M
from melanoma_tf import models, synthetic, train
from melanoma_tf import yardstick as Y
from melanoma_tf.backend import keras
from melanoma_tf.pipeline import load_images
from melanoma_tf.runs import resolve_stage_dir, split_frame

sys.path.insert(0, str(REPO / "tools"))
import wise_ft_yardstick as W  # noqa: E402

CONFIG = REPO / "configs" / "student_mobilenetv3.yaml"


def test_the_linear_head_works_on_raw_features_with_c_chosen_on_validation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 12)) * rng.uniform(0.1, 30, 12) + rng.normal(size=12) * 50  # unscaled features
    direction = rng.normal(size=12) / x.std(axis=0)
    y = ((x - x.mean(axis=0)) @ direction + rng.normal(size=400) > 0.5).astype(int)
    kernel, bias, choice = F.fit_linear_head(x[:300], y[:300], x[300:], y[300:])
    assert kernel.shape == (12, 1) and bias.shape == (1,)
    scores = choice["val_score_by_C"]
    assert choice["C"] in F.C_GRID and scores[str(choice["C"])] == max(scores.values())
    scaler = StandardScaler().fit(x[:300])
    reference = LogisticRegression(C=choice["C"], class_weight="balanced", max_iter=5000).fit(
        scaler.transform(x[:300]), y[:300])
    np.testing.assert_allclose((x[300:] @ kernel + bias).ravel(),
                               reference.decision_function(scaler.transform(x[300:])), rtol=1e-3, atol=1e-3)
    assert M.roc_auc(y[300:], (x[300:] @ kernel + bias).ravel()) > 0.85
    classes = np.digitize((x - x.mean(axis=0)) @ direction, [-0.5, 0.5])  # three classes: one output each
    kernel, bias, _ = F.fit_linear_head(x[:300], classes[:300], x[300:], classes[300:])
    assert kernel.shape == (12, 3) and np.mean(np.argmax(x[300:] @ kernel + bias, axis=1) == classes[300:]) > 0.7


def _small_model(seed: int, width: int = 4) -> keras.Model:
    keras.utils.set_random_seed(seed)
    image = keras.Input((8, 8, 3))
    x = keras.layers.BatchNormalization(name="bn")(keras.layers.Conv2D(width, 3, name="conv")(image))
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(image, keras.layers.Dense(1, name="logits")(x))


def test_wise_ft_interpolates_every_weight_batchnorm_statistics_included(tmp_path):
    start, tuned = _small_model(0), _small_model(1)
    tuned.get_layer("bn").set_weights([w + 3.0 for w in tuned.get_layer("bn").get_weights()])  # moving stats too
    models.save_model(start, tmp_path / "start.keras")
    before = tuned.get_weights()
    F.interpolate_weights(tuned, tmp_path / "start.keras", 0.25)
    for mixed, s, f in zip(tuned.get_weights(), start.get_weights(), before):
        np.testing.assert_allclose(mixed, 0.75 * s + 0.25 * f, rtol=1e-6, atol=1e-6)
    F.interpolate_weights(tuned, tmp_path / "start.keras", 0.0)
    for mixed, s in zip(tuned.get_weights(), start.get_weights()):
        np.testing.assert_allclose(mixed, s, atol=1e-6)
    with pytest.raises(F.FineTuneError, match=r"start.keras: another architecture"):
        F.interpolate_weights(_small_model(0, width=6), tmp_path / "start.keras", 0.5)


def test_wise_ft_needs_the_linear_probe_and_a_weight_in_range():
    base = cfgmod.load(CONFIG)
    with pytest.raises(cfgmod.ConfigError, match=r"train.wise_ft: interpolates from the linear-probe start"):
        cfgmod.replace(base, "train.wise_ft", 0.5).validate()
    with pytest.raises(cfgmod.ConfigError, match=r"train.wise_ft: must be in \[0, 1\]"):
        cfgmod.replace(cfgmod.replace(base, "train.linear_probe", True), "train.wise_ft", 1.5).validate()


def test_lp_ft_fits_the_head_before_training_and_wise_ft_zero_keeps_that_start(synthetic_root, tmp_path, capsys):
    sets = tiny_overrides(synthetic_root, tmp_path / "runs", **{"train.linear_probe": "true", "train.wise_ft": 0.0,
                                                               "student.weights": "null"})
    assert train.main(["--config", str(CONFIG), "--run-dir", str(tmp_path / "run")]
                      + [a for s in sets for a in ("--set", s)]) == 0
    stage = resolve_stage_dir(tmp_path / "run")
    start = models.load_model(stage / "start" / "model.keras")
    final = models.load_model(stage / "model.keras")
    for a, b in zip(start.get_weights(), final.get_weights()):  # w = 0: the kept model is the start
        np.testing.assert_allclose(a, b, atol=1e-6)
    tuned = models.load_model(stage / "model.keras")
    tuned.load_weights(str(stage / "best.weights.h5"))
    assert any(not np.allclose(a, b) for a, b in zip(start.get_weights(), tuned.get_weights()))  # it did train
    metrics = json.loads((stage / "metrics.json").read_text())
    probe = metrics["start_weights"]["linear_probe"]
    cfg = cfgmod.load(stage / "config.yaml")
    val = split_frame(cfg, stage, "val")
    val_z = start.predict(load_images(val["path"].tolist(), cfg.data.image_size), verbose=0).ravel()
    labels = val["label"].to_numpy()
    # the start's head is the probe that was chosen on validation: its score there is the start model's
    assert probe["val_score"] == pytest.approx(M.roc_auc(labels, val_z), abs=0.02) and probe["val_score"] > 0.6
    assert metrics["wise_ft"]["weight"] == 0.0
    assert metrics["wise_ft"]["val_roc_auc"] == pytest.approx(probe["val_score"], abs=0.02)


@pytest.fixture(scope="module")
def lpft_yardstick(tmp_path_factory) -> Path:
    """A tiny LP-FT yardstick: two clinics (column ``clinic``), one seed, one epoch each."""
    base = tmp_path_factory.mktemp("lpft")
    root = synthetic.generate(base / "data", n_lesions=120, melanoma_fraction=0.4, image_size=40, seed=5)
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    lesions = sorted(meta["lesion_id"].unique())
    meta["clinic"] = meta["lesion_id"].map({lesion: ("clinic_a", "clinic_b")[i % 2] for i, lesion in enumerate(lesions)})
    meta.to_csv(root / "HAM10000_metadata.csv", index=False)
    sets = [f"data.root={root}", "data.image_size=32", "data.augment.rotation=0.0", "student.weights=null",
            "student.minimalistic=true", "student.alpha=0.75", "train.epochs=1", "train.batch_size=32",
            "train.verbose=0", "data.source_column=clinic", "data.external=[]", "train.linear_probe=true"]
    out = base / "lpft"
    assert Y.main(["--config", str(CONFIG), "--seeds", "1", "--clinics", "clinic_a,clinic_b", "--reported", "",
                   "--no-random", "--out", str(out)] + [a for s in sets for a in ("--set", s)]) == 0
    return out


def test_the_mixing_weight_is_scored_on_the_yardstick_against_the_fine_tune(lpft_yardstick, tmp_path, capsys):
    assert W.main([str(lpft_yardstick), "--weights", "0,0.5", "--out", str(tmp_path), "--bootstrap", "50"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wise-ft: {tmp_path / 'wise_ft.md'}"
    result = json.loads((tmp_path / "wise_ft.json").read_text())
    assert sorted(result["weights"]) == ["0", "0.5", "1"]
    plain = json.loads((lpft_yardstick / "yardstick.json").read_text())
    assert result["weights"]["1"]["loco_mean"] == pytest.approx(plain["loco_mean"]["mean"])  # w = 1: the runs
    assert result["chosen_weight"] == float(max(result["weights"], key=lambda w: result["weights"][w]["loco_mean"]))
    stage = resolve_stage_dir(lpft_yardstick / "clinic_a" / "seed1")
    start, tuned = (models.load_model(stage / name / "model.keras") for name in ("start", "."))
    half = models.load_model(stage / "wise" / "w0.5" / "model.keras")
    for m, s, t in zip(half.get_weights(), start.get_weights(), tuned.get_weights()):
        np.testing.assert_allclose(m, 0.5 * s + 0.5 * t, rtol=1e-5, atol=1e-5)
    zero = [pd.read_csv(resolve_stage_dir(lpft_yardstick / "clinic_a" / f"seed{s}") / "wise" / "w0" / "eval_holdout"
                        / "predictions.csv") for s in (1,)]
    assert result["weights"]["0"]["clinics"]["clinic_a"] == pytest.approx(
        np.mean([M.roc_auc(f["label"], f["probability"]) for f in zero]))
    paired = result["weights"]["0.5"]["vs_finetuned"]
    assert paired["low"] <= paired["difference"] <= paired["high"] and "vs_finetuned" not in result["weights"]["1"]
    assert paired["difference"] == pytest.approx(result["weights"]["0.5"]["loco_mean"]
                                                 - result["weights"]["1"]["loco_mean"], abs=1e-9)
    assert str(tmp_path) not in (tmp_path / "wise_ft.md").read_text() + (tmp_path / "wise_ft.json").read_text()

    copy = tmp_path / "no_start"
    shutil.copytree(lpft_yardstick, copy)
    shutil.rmtree(resolve_stage_dir(copy / "clinic_b" / "seed1") / "start")
    assert W.main([str(copy), "--weights", "0.5"]) == 2
    assert "clinic_b/seed1 trained without train.linear_probe" in capsys.readouterr().err
    assert W.main([str(lpft_yardstick), "--weights", "0.5,2"]) == 2
    assert "--weights '0.5,2': expected numbers in [0, 1]" in capsys.readouterr().err
