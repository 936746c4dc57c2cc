"""Cross-fitting: K fold models on every non-holdout image, combined, with the operating point out of fold."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, tiny_overrides
from melanoma_tf import config as C
from melanoma_tf import crossfit as CF
from melanoma_tf import metrics as M
from melanoma_tf import models
from melanoma_tf.pipeline import load_images
from melanoma_tf.runs import RunError, split_frame

CONFIG = REPO / "configs" / "student_mobilenetv3.yaml"


@pytest.fixture(scope="module")
def crossfitted(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("crossfit") / "cf"
    overrides = tiny_overrides(synthetic_root, out.parent, **{"train.epochs": 1, "data.split_seed": 3})
    return CF.crossfit(CONFIG, overrides, 3, out), overrides


def test_every_non_holdout_image_is_scored_once_by_the_fold_that_did_not_train_on_it(crossfitted):
    out, _ = crossfitted
    oof = pd.read_csv(out / "oof_logits.csv")
    splits = pd.read_csv(out / "splits.csv")
    folds = [pd.read_csv(out / f"fold{k}" / "splits.csv") for k in range(3)]
    holdout = set(splits.loc[splits["split"] == "holdout", "image_id"])
    assert all(set(f.loc[f["split"] == "holdout", "image_id"]) == holdout for f in folds)
    # the combination trained on everything else
    assert set(splits["split"]) == {"train", "holdout"} and len(splits) == len(folds[0])
    assert set(oof["image_id"]) == set(splits.loc[splits["split"] == "train", "image_id"])
    assert oof["image_id"].is_unique and not holdout & set(oof["image_id"])
    for k, fold in enumerate(folds):
        val = set(fold.loc[fold["split"] == "val", "image_id"])
        assert set(oof.loc[oof["fold"] == k, "image_id"]) == val
        assert not val & set(fold.loc[fold["split"] == "train", "image_id"])
    # each logit is its fold model's own, image by image (fold 1 recomputed)
    cfg = C.load(out / "fold1" / "config.yaml")
    val = split_frame(cfg, out / "fold1", "val")
    z = models.load_model(out / "fold1" / "model.keras").predict(load_images(val["path"].tolist(), 32), verbose=0)
    expected = pd.Series(z.reshape(-1), index=val["image_id"])
    got = oof.set_index("image_id").loc[val["image_id"], "logit"]
    np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), rtol=1e-5, atol=1e-5)
    record = json.loads((out / "crossfit.json").read_text())
    assert record["folds"] == 3 and record["combine"] == "ensemble" and record["n_out_of_fold"] == len(oof)
    assert record["out_of_fold_roc_auc"] == pytest.approx(M.roc_auc(oof["melanoma"], oof["logit"]))


def test_the_combination_is_scored_at_the_out_of_fold_operating_point(crossfitted, tmp_path):
    from melanoma_tf import evaluate as E
    from melanoma_tf import quantize as Q

    out, _ = crossfitted
    images = load_images(split_frame(C.load(out / "config.yaml"), out, "holdout")["path"].tolist()[:12], 32)
    each = [models.load_model(out / f"fold{k}" / "model.keras").predict(images, verbose=0) for k in range(3)]
    np.testing.assert_allclose(models.load_model(out / "model.keras").predict(images, verbose=0),
                               np.mean(each, axis=0), rtol=1e-5, atol=1e-5)
    assert E.main(["--run", str(out), "--bootstrap", "20", "--gradcam", "0", "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    oof = pd.read_csv(out / "oof_logits.csv")
    y, z = oof["melanoma"].to_numpy(), oof["logit"].to_numpy()
    assert metrics["threshold_source"] == "out-of-fold predictions (cross-fit)"
    assert metrics["threshold"] == pytest.approx(M.threshold_for_sensitivity(y, M.sigmoid(z), 0.95), rel=1e-9)
    assert metrics["platt"] == pytest.approx(list(M.fit_platt(z, y)), rel=1e-6)
    assert metrics["temperature"] == pytest.approx(M.fit_temperature(z, y), rel=1e-6)
    assert metrics["n_images"] == len(split_frame(C.load(out / "config.yaml"), out, "holdout"))
    # quantized, its sidecar carries the same operating point (post-training modes; QAT needs a validation split)
    folder = Q.quantize_run(out, ("fp16",), n_boot=20, latency_runs=2)
    sidecar = json.loads((folder / "fp16.json").read_text())
    assert sidecar["threshold"] == pytest.approx(metrics["threshold"], rel=1e-9)


def test_a_second_call_keeps_the_trained_folds(crossfitted):
    out, overrides = crossfitted
    before = {k: (out / f"fold{k}" / "model.keras").stat().st_mtime_ns for k in range(3)}
    CF.crossfit(CONFIG, overrides, 3, out)
    assert {k: (out / f"fold{k}" / "model.keras").stat().st_mtime_ns for k in range(3)} == before
    # folds of another config are neither kept nor continued: named, before anything trains
    with pytest.raises(C.ConfigError, match=r"fold0: the config differs from the run's in \['train.lr'\]"):
        CF.crossfit(CONFIG, [*overrides, "train.lr=0.01"], 3, out)
    assert {k: (out / f"fold{k}" / "model.keras").stat().st_mtime_ns for k in range(3)} == before


def test_bad_requests_are_named(crossfitted, tmp_path, capsys):
    out, overrides = crossfitted
    assert CF.main(["--config", str(CONFIG), "--folds", "1", "--out", str(tmp_path / "x")]) == 2
    assert "error: --folds 1: cross-fitting needs at least 2 folds" in capsys.readouterr().err
    with pytest.raises(C.ConfigError, match="--combine blend"):
        CF.crossfit(CONFIG, overrides, 3, out, combine="blend")
    # two folds that validate on the same images are not a cross-fit
    with pytest.raises(RunError, match="validates on .* image\\(s\\) another fold validated on"):
        CF.out_of_fold([out / "fold0", out / "fold0"])
    # a damaged out-of-fold file is named, not scored
    broken = pd.read_csv(out / "oof_logits.csv")
    broken.loc[0, "logit"] = np.nan
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    broken.to_csv(damaged / "oof_logits.csv", index=False)
    from melanoma_tf.runs import read_out_of_fold

    with pytest.raises(RunError, match="oof_logits.csv: a logit is blank"):
        read_out_of_fold(damaged)
