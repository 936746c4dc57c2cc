"""Generalization checks: leave-one-clinic-out holdout, external sets beside the holdout, shift augmentation,
teachers at their own resolution, calibration stored with a model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, tiny_overrides
from melanoma_tf import config as C
from melanoma_tf import data as D
from melanoma_tf import evaluate as evaluate_cmd
from melanoma_tf import evaluation as E
from melanoma_tf import metrics as M
from melanoma_tf import runs
from melanoma_tf import train as T
from melanoma_tf.pipeline import load_images


def _frame(n_lesions=120, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_lesions):
        source = ["rosendahl", "vidir_modern", "vidir_molemax"][i % 3]
        for k in range(1 + (i % 4 == 0)):
            rows.append({"image_id": f"ISIC_{i:04d}{k}", "lesion_id": f"L{i}", "label": int(rng.random() < 0.3),
                         "dataset": source})
    return pd.DataFrame(rows)


def test_holdout_source_holds_out_exactly_one_clinic():
    frame = _frame()
    split = D.lesion_grouped_split(frame, seed=3, holdout_source="rosendahl")
    assert set(split[frame["dataset"] == "rosendahl"]) == {"holdout"}
    assert "holdout" not in set(split[frame["dataset"] != "rosendahl"])
    assert set(split[frame["dataset"] != "rosendahl"]) == {"train", "val"}
    assert (frame.assign(split=split).groupby("lesion_id")["split"].nunique() == 1).all()
    # Same seed, same split; the random holdout is not what holdout_source gives.
    assert split.equals(D.lesion_grouped_split(frame, seed=3, holdout_source="rosendahl"))
    assert not split.equals(D.lesion_grouped_split(frame, seed=3))


def test_holdout_source_errors_name_the_sources():
    frame = _frame()
    with pytest.raises(D.DataError, match=r"no image has dataset 'vienna_dias'.*'rosendahl', 'vidir_modern'"):
        D.lesion_grouped_split(frame, seed=0, holdout_source="vienna_dias")
    with pytest.raises(D.DataError, match="needs a 'dataset' column"):
        D.lesion_grouped_split(frame.drop(columns="dataset"), seed=0, holdout_source="rosendahl")
    with pytest.raises(D.DataError, match="the only source"):
        D.lesion_grouped_split(frame.assign(dataset="rosendahl"), seed=0, holdout_source="rosendahl")


def test_external_sets_config_is_typed():
    cfg = C.load(REPO / "configs" / "student_mobilenetv3.yaml",
                 ["data.external=[{name: clinic_b, images: /x/img, labels: /x/l.csv, required: true}]"])
    assert cfg.data.external == (C.ExternalSet("clinic_b", "/x/img", "/x/l.csv", True),)
    assert C.load(REPO / "configs" / "student_mobilenetv3.yaml").data.external[0].name == "isic2017"
    with pytest.raises(C.ConfigError, match=r"unknown config key 'data.external\[0\].image'"):
        C.load(REPO / "configs" / "student_mobilenetv3.yaml", ["data.external=[{name: a, image: b}]"])


@pytest.fixture(scope="module")
def external_set(synthetic_root, tmp_path_factory):
    """An 'external' set: images of a second synthetic dataset made with another seed."""
    from melanoma_tf import synthetic

    root = synthetic.generate(tmp_path_factory.mktemp("ext"), n_lesions=60, melanoma_fraction=0.3, image_size=48,
                              seed=99)
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    labels = root / "labels.csv"
    meta.assign(label=(meta["dx"] == "mel").astype(int))[["image_id", "label"]].to_csv(labels, index=False)
    return root / "images", labels, meta


@pytest.mark.slow
def test_every_run_scores_its_external_sets_beside_the_holdout(synthetic_root, external_set, tmp_path):
    images, labels, meta = external_set
    overrides = tiny_overrides(synthetic_root, tmp_path, **{"output.evaluate": "true", "train.epochs": 2})
    overrides.append(f"data.external=[{{name: clinic_b, images: {images}, labels: {labels}}}, "
                     f"{{name: absent, images: {tmp_path / 'none'}, labels: {tmp_path / 'none.csv'}}}]")
    run_dir = T.run(C.load(REPO / "configs" / "student_mobilenetv3.yaml", overrides))
    holdout = json.loads((run_dir / "eval_holdout" / "metrics.json").read_text())
    ext = holdout["external"]["clinic_b"]
    assert ext["n_images"] == len(meta) and ext["n_melanoma"] == int((meta["dx"] == "mel").sum())
    assert holdout["external"]["absent"]["skipped"].startswith("not found")
    detail = json.loads((run_dir / "eval_holdout" / "external" / "clinic_b" / "metrics.json").read_text())
    # The same validation-chosen threshold and calibration as the holdout, not refitted on the external data.
    assert detail["threshold"] == holdout["threshold"] and detail["platt"] == holdout["platt"]
    predictions = pd.read_csv(run_dir / "eval_holdout" / "external" / "clinic_b" / "predictions.csv")
    assert ext["roc_auc"] == pytest.approx(M.roc_auc(predictions["label"], predictions["probability"]))
    report = (run_dir / "eval_holdout" / "report.md").read_text()
    assert "## External test sets" in report and "| clinic_b |" in report and "skipped: not found" in report
    compare = (run_dir / "compare" / "compare.md").read_text()
    assert "clinic_b ROC-AUC" in compare and f"{ext['roc_auc']:.3f}" in compare
    # --no-external scores the split alone (what the reference run's validation comparisons need)
    assert evaluate_cmd.main(["--run", str(run_dir), "--split", "val", "--no-external", "--bootstrap", "20", "--gradcam", "0",
                   "--latency-runs", "2", "--out", str(tmp_path / "val_only")]) == 0
    val_only = json.loads((tmp_path / "val_only" / "metrics.json").read_text())
    assert not val_only.get("external") and not (tmp_path / "val_only" / "external").exists()
    assert val_only["n_images"] == len(pd.read_csv(tmp_path / "val_only" / "predictions.csv"))


@pytest.mark.slow
def test_mobilenet_v2_teacher_head_then_finetune_and_cached_logits_at_its_size(synthetic_root, tmp_path):
    overrides = tiny_overrides(synthetic_root, tmp_path, **{
        "stages": "[teacher, distill]", "teacher.arch": "mobilenet_v2", "teacher.mode": "frozen",
        "teacher.epochs": 1, "teacher.finetune_blocks": 3, "teacher.finetune_epochs": 1,
        "teacher.finetune_lr": 1.0e-4, "distill.teacher_outputs": "cached", "distill.teacher_tta": "true",
        "train.epochs": 1, "output.evaluate": "false"})
    cfg = C.load(REPO / "configs" / "quickstart.yaml", overrides)
    # The teacher trains at 48 px, the student at 32: build the teacher stage at its own size.
    run_dir = T.run(C.load(REPO / "configs" / "quickstart.yaml", overrides + ["stages=[teacher]",
                                                                                "data.image_size=48"]))
    history = pd.read_csv(run_dir / "history.csv")
    assert history["phase"].tolist() == ["head", "finetune"]
    teacher_file = run_dir / "model.keras"
    from melanoma_tf import models
    from melanoma_tf.distill.teachers import teacher_input_size

    assert teacher_input_size([teacher_file]) == 48
    distill = T.run(C.replace(C.replace(cfg, "distill.teacher", (str(teacher_file),)), "stages", ("distill",)))
    cached = np.load(distill / "teacher_logits.npz")
    data = runs.prepare_data(cfg)
    train = data.part("train")
    assert list(cached["image_id"]) == train["image_id"].tolist()
    teacher = models.load_model(teacher_file)
    images = load_images(train["path"].tolist()[:16], 48)
    views = [teacher.predict(v, verbose=0) for v in (images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1])]
    np.testing.assert_allclose(cached["logits"][:16], np.mean(views, axis=0), rtol=1e-4, atol=1e-4)


def test_shift_augmentation_layers():
    from melanoma_tf.pipeline import RandomColourCast, RandomVignette, build_augmenter

    images = np.full((8, 32, 32, 3), 100.0, np.float32)
    cast = RandomColourCast(0.2, seed=1)(images, training=True).numpy()
    gains = cast[:, 0, 0, :] / 100.0
    assert np.all((gains >= 0.8 - 1e-6) & (gains <= 1.2 + 1e-6)) and gains.std() > 0.01
    assert np.all(cast == cast[:, :1, :1, :])  # one gain per image and channel
    np.testing.assert_array_equal(RandomColourCast(0.2)(images, training=False), images)
    vignette = RandomVignette(0.5, seed=2)(images, training=True).numpy()
    assert np.all(vignette[:, 0, 0] <= vignette[:, 16, 16] + 1e-4)  # corners darker than the centre
    assert vignette[:, 0, 0].min() >= 50.0 - 1e-3 and vignette.max() <= 100.0 + 1e-3
    augmenter = build_augmenter(C.AugmentConfig(flip=False, rotation=0, zoom=0, translate=0, brightness=0,
                                                contrast=0, saturation=0, hue=0, crop_area_min=0.5, colour_cast=0.1,
                                                blur_sigma=1.0, vignette=0.3), seed=0, image_size=32)
    names = [type(layer).__name__ for layer in augmenter.layers]
    assert names == ["RandomCropAndResize", "RandomColourCast", "RandomVignette", "RandomGaussianBlur"]
    out = augmenter(np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32), training=True)
    assert out.shape == (4, 32, 32, 3)
