"""evaluate / compare / baselines end to end on a tiny trained run."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, tiny_overrides
from melanoma_tf import config as C
from melanoma_tf import evaluate as E
from melanoma_tf import evaluation
from melanoma_tf import metrics as M
from melanoma_tf import runs
from melanoma_tf import train as T
from melanoma_tf.pipeline import load_images

BINARY_KEYS = {"roc_auc", "roc_auc_ci", "pr_auc", "threshold", "sensitivity", "specificity", "ppv", "npv", "f1",
               "ece", "ece_calibrated", "params", "flops", "size_mb", "latency_ms_median", "n_images"}


@pytest.fixture(scope="module")
def tiny_run(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = C.load(REPO / "configs" / "student_mobilenetv3.yaml",
                 tiny_overrides(synthetic_root, out, **{"train.epochs": 3}))
    return T.run(cfg)


def last_line(capsys):
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_evaluate_run_holdout(tiny_run, capsys):
    assert E.main(["--run", str(tiny_run), "--bootstrap", "100", "--latency-runs", "50", "--gradcam", "2"]) == 0
    line = last_line(capsys)
    assert line.startswith("report: ")
    report = Path(line[len("report: "):])
    out = report.parent
    assert out == tiny_run / "eval_holdout"
    metrics = json.loads((out / "metrics.json").read_text())
    assert BINARY_KEYS <= set(metrics)
    splits = pd.read_csv(tiny_run / "splits.csv")
    holdout = splits[splits["split"] == "holdout"]
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns[:4]) == ["image_id", "lesion_id", "label", "probability"]
    assert sorted(predictions["image_id"]) == sorted(holdout["image_id"]) and metrics["n_images"] == len(holdout)
    assert predictions["probability"].between(0, 1).all()
    assert metrics["roc_auc"] == pytest.approx(M.roc_auc(predictions["label"], predictions["probability"]))
    assert metrics["roc_auc_ci"][0] <= metrics["roc_auc"] <= metrics["roc_auc_ci"][1]
    # the threshold is chosen on validation: recompute it from the model's validation predictions
    from melanoma_tf.models import load_model

    cfg = C.load(tiny_run / "config.yaml")
    val = runs.split_frame(cfg, tiny_run, "val")
    p_val = M.sigmoid(load_model(tiny_run / "model.keras").predict(load_images(val["path"].tolist(), 32),
                                                                   verbose=0).ravel())
    assert metrics["threshold"] == pytest.approx(M.threshold_for_sensitivity(val["label"], p_val, 0.95), rel=1e-5)
    assert metrics["threshold_source"] == "validation"
    rates = M.rates_at(predictions["label"], predictions["probability"], metrics["threshold"])
    assert metrics["specificity"] == pytest.approx(rates["specificity"])
    text = report.read_text()
    assert "| ROC-AUC | PR-AUC | threshold |" in text and "Subgroup audit" in text
    for png in ("roc.png", "pr.png", "reliability.png", "threshold_sweep.png", "confusion.png"):
        assert (out / png).stat().st_size > 1000
    assert C.load(out / "config.yaml") == C.load(tiny_run / "config.yaml")
    assert json.loads((out / "evaluation.json").read_text())["split"] == "holdout"
    assert metrics["latency_runs"] == 50 and metrics["params"] > 0 and metrics["flops"] > 0


def convert(model_path, out, int8_images=None):
    from melanoma_tf.backend import tf
    from melanoma_tf.models import load_model

    converter = tf.lite.TFLiteConverter.from_keras_model(load_model(model_path))
    if int8_images is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([img[None]] for img in int8_images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    out.write_bytes(converter.convert())
    return out


def colour_model(tiny_run, path):
    """A small CNN fitted on the run's training split; int8 post-training quantization suits it.

    (MobileNetV3's int8 PTQ collapses at this size; making it quantize well is the quantization issue's job.)
    """
    from melanoma_tf.backend import keras
    from melanoma_tf.models import save_model

    cfg = C.load(tiny_run / "config.yaml")
    train = runs.split_frame(cfg, tiny_run, "train")
    x = load_images(train["path"].tolist(), 32)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Rescaling(1 / 255.0)(inputs)
    h = keras.layers.Conv2D(8, 3, activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True))
    model.fit(x, train["label"].to_numpy(), epochs=30, batch_size=32, verbose=0)
    save_model(model, path)
    return path, x


@pytest.mark.slow
def test_evaluate_tflite_fp32_and_int8(tiny_run, tmp_path, capsys):
    model_path, train_images = colour_model(tiny_run, tmp_path / "cnn.keras")
    fp32 = convert(model_path, tmp_path / "fp32.tflite")
    int8 = convert(model_path, tmp_path / "int8.tflite", train_images[:100])
    keras_out = evaluation.evaluate(str(tiny_run), str(model_path), split="val", n_boot=50, gradcam=0, latency_runs=50,
                           out=str(tmp_path / "keras"))
    reference = json.loads((keras_out.parent / "metrics.json").read_text())
    assert reference["roc_auc"] > 0.7, "the reference model should have learnt something"
    for path, tolerance in ((fp32, 1e-3), (int8, 0.02)):
        assert E.main(["--run", str(tiny_run), "--model", str(path), "--split", "val", "--bootstrap", "50",
                       "--gradcam", "0", "--out", str(tmp_path / path.stem)]) == 0
        metrics = json.loads((tmp_path / path.stem / "metrics.json").read_text())
        assert metrics["runtime"] == "tflite" and metrics["size_mb"] < reference["size_mb"]
        assert metrics["roc_auc"] == pytest.approx(reference["roc_auc"], abs=tolerance)
        assert "optimistic" in metrics["threshold_source"]
    from melanoma_tf.tflite import TFLiteModel

    lite = TFLiteModel(int8)
    assert lite.input_dtype == np.int8 and lite.output_dtype == np.int8
    scale, zero = lite._input["quantization"]
    assert scale == pytest.approx(1.0, rel=0.05)  # [0, 255] pixels fill the int8 range
    np.testing.assert_allclose(lite.predict(train_images[:16]).ravel(),
                               TFLiteModel(fp32).predict(train_images[:16]).ravel(), atol=0.15)


def test_external_images_and_sidecar(tiny_run, synthetic_root, tmp_path, capsys):
    splits = pd.read_csv(tiny_run / "splits.csv")
    holdout = splits[splits["split"] == "holdout"]
    images = tmp_path / "external"
    images.mkdir()
    for image_id in holdout["image_id"]:
        shutil.copy(synthetic_root / "images" / f"{image_id}.jpg", images / f"{image_id}.jpg")
    labels = tmp_path / "labels.csv"
    holdout[["image_id", "label"]].to_csv(labels, index=False)
    assert E.main(["--run", str(tiny_run), "--images", str(images), "--labels", str(labels), "--bootstrap", "50",
                   "--gradcam", "0", "--out", str(tmp_path / "ext")]) == 0
    ext = json.loads((tmp_path / "ext" / "metrics.json").read_text())
    assert ext["n_images"] == len(holdout) and ext["split"] == "external"
    assert ext["threshold_source"] == "validation"
    # a .tflite with its sidecar scores external data without a run, using the sidecar's threshold
    model = convert(tiny_run / "model.keras", tmp_path / "student.tflite")
    (tmp_path / "student.json").write_text(json.dumps({"threshold": ext["threshold"], "input_size": 32,
                                                      "labels": "binary", "temperature": 1.0}))
    assert E.main(["--model", str(model), "--images", str(images), "--labels", str(labels), "--bootstrap", "50",
                   "--out", str(tmp_path / "side")]) == 0
    side = json.loads((tmp_path / "side" / "metrics.json").read_text())
    assert side["threshold_source"] == "sidecar" and side["threshold"] == pytest.approx(ext["threshold"])
    p_keras = pd.read_csv(tmp_path / "ext" / "predictions.csv")["probability"]
    p_lite = pd.read_csv(tmp_path / "side" / "predictions.csv")["probability"]
    np.testing.assert_allclose(p_lite, p_keras, atol=1e-4)


def test_evaluate_bad_inputs(tiny_run, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,label\nISIC_9000000,1\nISIC_9000001,2\n")
    assert E.main(["--run", str(tiny_run), "--images", str(tmp_path), "--labels", str(bad)]) == 2
    assert "row 3: label '2'" in capsys.readouterr().err
    with pytest.raises(evaluation.EvaluationError, match=r"row 3: label"):
        evaluation.external_frame(tmp_path, bad)
    nolabel = tmp_path / "nolabel.csv"
    nolabel.write_text("image_id\nISIC_1\n")
    with pytest.raises(evaluation.EvaluationError, match="missing column 'label'"):
        evaluation.external_frame(tmp_path, nolabel)
    absent = tmp_path / "absent.csv"
    absent.write_text("image_id,label\nISIC_0000001,1\n")
    with pytest.raises(evaluation.EvaluationError, match="not in"):
        evaluation.external_frame(tmp_path, absent)
    assert E.main(["--run", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert E.main(["--run", str(tiny_run), "--model", str(tmp_path / "nope.tflite")]) == 2
    assert "nope.tflite" in capsys.readouterr().err
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a flatbuffer")
    assert E.main(["--run", str(tiny_run), "--model", str(junk)]) == 2
    assert E.main(["--model", str(junk)]) == 2
    capsys.readouterr()
    assert E.main(["--run", str(tiny_run), str(tiny_run), "--out", str(tmp_path / "both")]) == 2
    assert "a single --run (got 2 runs)" in capsys.readouterr().err and not (tmp_path / "both").exists()


@pytest.mark.slow
def test_baselines_and_compare(tiny_run, synthetic_root, tmp_path, capsys):
    from melanoma_tf import baselines as B
    from melanoma_tf import compare as compare_cmd

    cfg = C.load(REPO / "configs" / "student_mobilenetv3.yaml", tiny_overrides(synthetic_root, tmp_path))
    out = B.run_baselines(cfg, str(tiny_run), ("logreg", "hgb", "rf"), n_boot=50)
    pd.testing.assert_frame_equal(pd.read_csv(out / "splits.csv"), pd.read_csv(tiny_run / "splits.csv"))
    for name in ("logreg", "hgb", "rf"):
        metrics = json.loads((out / name / "eval_holdout" / "metrics.json").read_text())
        assert BINARY_KEYS - {"flops"} <= set(metrics) and metrics["model_name"] == f"baseline_{name}"
        assert metrics["roc_auc"] > 0.8  # colour features separate the synthetic classes well
    features = B.colour_texture_features(np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)))
    assert features.shape == (3, 249) and np.isfinite(features).all()
    assert E.main(["--run", str(tiny_run), "--bootstrap", "50", "--gradcam", "0"]) == 0
    capsys.readouterr()
    assert compare_cmd.main([str(tiny_run), str(out), "--out", str(tmp_path / "cmp")]) == 0
    table = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert set(table["model"]) >= {"baseline_logreg", "baseline_hgb", "baseline_rf"}
    assert len(table) == 4
    for png in ("roc.png", "auc_vs_size.png", "auc_vs_latency.png"):
        assert (tmp_path / "cmp" / png).is_file()
    assert compare_cmd.main([str(tmp_path / "nothing")]) == 2


def _external_copy(tiny_run, synthetic_root, folder: Path) -> pd.DataFrame:
    """The tiny run's holdout images copied into ``folder``; returns their rows of splits.csv."""
    holdout = pd.read_csv(tiny_run / "splits.csv").query("split == 'holdout'")
    folder.mkdir()
    for image_id in holdout["image_id"]:
        shutil.copy(synthetic_root / "images" / f"{image_id}.jpg", folder / f"{image_id}.jpg")
    return holdout


def test_blank_lesion_ids_resample_images_and_the_report_says_so(tiny_run, synthetic_root, tmp_path):
    """A clinic without lesion ids: the column is there but blank. Every blank id was one 'lesion' (the whole
    set), so each resample was the set itself and the interval collapsed to the point estimate."""
    holdout = _external_copy(tiny_run, synthetic_root, tmp_path / "images")
    labels = tmp_path / "labels.csv"
    holdout[["image_id", "label"]].assign(lesion_id="").to_csv(labels, index=False)
    assert E.main(["--run", str(tiny_run), "--images", str(tmp_path / "images"), "--labels", str(labels),
                   "--bootstrap", "100", "--gradcam", "0", "--out", str(tmp_path / "ext")]) == 0
    ext = json.loads((tmp_path / "ext" / "metrics.json").read_text())
    low, high = ext["roc_auc_ci"]
    assert high - low > 0.01, ext["roc_auc_ci"]
    assert ext["bootstrap_grouping"] == {"unit": "images", "n_groups": len(holdout),
                                         "n_without_lesion_id": len(holdout)}
    assert f"resampling {len(holdout)} images" in (tmp_path / "ext" / "report.md").read_text()
    # Real lesion ids: resampled as lesions, and the report says how many.
    holdout[["image_id", "label", "lesion_id"]].to_csv(labels, index=False)
    assert E.main(["--run", str(tiny_run), "--images", str(tmp_path / "images"), "--labels", str(labels),
                   "--bootstrap", "20", "--gradcam", "0", "--out", str(tmp_path / "lesions")]) == 0
    grouping = json.loads((tmp_path / "lesions" / "metrics.json").read_text())["bootstrap_grouping"]
    n_lesions = holdout["lesion_id"].nunique()
    assert n_lesions < len(holdout) and grouping == {"unit": "lesions", "n_groups": n_lesions,
                                                     "n_without_lesion_id": 0}


def test_an_unreadable_image_is_named_or_skipped_and_counted(tiny_run, synthetic_root, tmp_path, capsys):
    holdout = _external_copy(tiny_run, synthetic_root, tmp_path / "images")
    (tmp_path / "images" / "ISIC_8000001.jpg").write_bytes(b"")  # a 0-byte file
    good = (tmp_path / "images" / f"{holdout['image_id'].iloc[0]}.jpg").read_bytes()
    (tmp_path / "images" / "ISIC_8000002.jpg").write_bytes(good[:len(good) // 3])  # a copy cut short
    labels = tmp_path / "labels.csv"
    rows = holdout[["image_id", "label"]]
    pd.concat([rows, pd.DataFrame({"image_id": ["ISIC_8000001", "ISIC_8000002"], "label": [1, 0]})]).to_csv(
        labels, index=False)
    args = ["--run", str(tiny_run), "--images", str(tmp_path / "images"), "--labels", str(labels), "--bootstrap",
            "20", "--gradcam", "0", "--out", str(tmp_path / "ext")]
    assert E.main(args + ["--on-corrupt", "error"]) == 2
    err = capsys.readouterr().err
    assert "2 image file(s)" in err and "ISIC_8000001.jpg" in err and "Traceback" not in err
    assert not (tmp_path / "ext" / "metrics.json").exists()
    assert E.main(args + ["--on-corrupt", "skip"]) == 0
    ext = json.loads((tmp_path / "ext" / "metrics.json").read_text())
    assert ext["n_images"] == len(holdout) and ext["n_skipped_unreadable"] == 2
    assert ext["skipped_unreadable"] == ["ISIC_8000001", "ISIC_8000002"]
    assert "2 listed image(s) could not be decoded" in (tmp_path / "ext" / "report.md").read_text()


def test_a_failing_external_set_never_costs_the_run_its_holdout_report(tiny_run, synthetic_root, tmp_path):
    import dataclasses

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    holdout = _external_copy(tiny_run, synthetic_root, tmp_path / "images")
    (tmp_path / "images" / "ISIC_8000001.jpg").write_bytes(b"")
    labels = tmp_path / "labels.csv"
    pd.concat([holdout[["image_id", "label"]], pd.DataFrame({"image_id": ["ISIC_8000001"], "label": [1]})]).to_csv(
        labels, index=False)
    cfg = C.load(run / "config.yaml")
    broken = C.ExternalSet(name="clinic_b", images=str(tmp_path / "images"), labels=str(labels))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, external=(broken,), on_corrupt="error"))
    C.save(cfg, run / "config.yaml")
    report = evaluation.evaluate(str(run), n_boot=20, gradcam=0, latency_runs=1)
    metrics = json.loads((report.parent / "metrics.json").read_text())
    assert metrics["n_images"] > 0 and "roc_auc" in metrics
    assert "ISIC_8000001.jpg" in metrics["external"]["clinic_b"]["failed"]
    assert "failed: " in report.read_text()
    # data.on_corrupt: skip scores the rest of the set, and counts what it left out.
    C.save(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, on_corrupt="skip")), run / "config.yaml")
    metrics = json.loads((evaluation.evaluate(str(run), n_boot=20, gradcam=0, latency_runs=1).parent
                          / "metrics.json").read_text())
    assert metrics["external"]["clinic_b"]["n_skipped_unreadable"] == 1
    assert metrics["external"]["clinic_b"]["n_images"] == len(holdout)


def _refuse_nan(name):
    raise ValueError(f"{name} is not JSON")


def test_json_holds_no_nan_for_undefined_metrics(tmp_path):
    """A subgroup with one class has no ROC-AUC: written as null, which JSON.parse and jq read (NaN they refuse)."""
    from melanoma_tf.files import write_json

    audit = M.subgroup_audit(pd.DataFrame({"sex": ["male"] * 4 + ["female"] * 4, "label": [0, 0, 0, 0, 0, 1, 0, 1],
                                           "prob": [0.1, 0.2, 0.3, 0.4, 0.2, 0.9, 0.1, 0.8]}), 0.5)
    payload = {"subgroups": audit, "values": np.array([1.0, np.nan, np.inf]), "n": np.int64(3),
               "nested": [{"x": float("nan")}]}
    write_json(tmp_path / "m.json", payload)
    loaded = json.loads((tmp_path / "m.json").read_text(), parse_constant=_refuse_nan)
    assert loaded["values"] == [1.0, None, None] and loaded["n"] == 3 and loaded["nested"] == [{"x": None}]
    male = next(row for row in loaded["subgroups"] if row["group"] == "male")
    assert male["n_melanoma"] == 0 and male["roc_auc"] is None and male["sensitivity"] is None


def test_atomic_writes_leave_files_readable_as_open_would(tmp_path):
    """write_atomic goes through a temporary file (mode 0600); the result must get open()'s mode, so a model
    folder served by a web server or shared with other users stays readable."""
    import os
    import stat

    from melanoma_tf.files import write_atomic, write_json

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "model.tflite", b"TFL3")
        write_json(tmp_path / "model.json", {"a": 1})
        (tmp_path / "plain.txt").write_text("open()")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
        os.umask(0o077)
        write_atomic(tmp_path / "private.bin", b"x")
    finally:
        os.umask(old)
    assert modes == {"model.tflite": 0o644, "model.json": 0o644, "plain.txt": 0o644}
    assert stat.S_IMODE((tmp_path / "private.bin").stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["student_int8_eval.json", "student_fp16_eval.json",
                                  "tiny_student_int8_eval.json", "phone_ensemble_fp16_eval.json", "metrics.json"])
def test_committed_results_are_strict_json(name):
    path = REPO / "results" / "reference_ham10000" / name
    json.loads(path.read_text(), parse_constant=_refuse_nan)


def test_a_tflite_scored_from_its_sidecar_applies_the_stored_calibration_per_image(tiny_run, synthetic_root,
                                                                                   tmp_path):
    """No run, only the .tflite and its sidecar: every row of predictions.csv uses the stored threshold, temperature,
    referral band and Platt calibration (a fit here on the scored images would give other numbers)."""
    from melanoma_tf.tflite import TFLiteModel

    holdout = _external_copy(tiny_run, synthetic_root, tmp_path / "images")
    labels = tmp_path / "labels.csv"
    holdout[["image_id", "label"]].to_csv(labels, index=False)
    model = convert(tiny_run / "model.keras", tmp_path / "student.tflite")
    sidecar = {"threshold": 0.4, "threshold_logit": float(M.logit(0.4)), "temperature": 1.7,
               "refer_margin_logit": 0.3, "calibration": {"method": "platt", "a": 0.6, "b": -0.4},
               "input_size": 32, "labels": "binary"}
    (tmp_path / "student.json").write_text(json.dumps(sidecar))
    assert E.main(["--model", str(model), "--images", str(tmp_path / "images"), "--labels", str(labels),
                   "--bootstrap", "20", "--out", str(tmp_path / "scored")]) == 0
    rows = pd.read_csv(tmp_path / "scored" / "predictions.csv").set_index("image_id")
    paths = [str(tmp_path / "images" / f"{i}.jpg") for i in rows.index]
    z = TFLiteModel(model).predict(load_images(paths, 32)).reshape(-1)
    np.testing.assert_allclose(rows["logit"], z, rtol=0, atol=1e-5)  # the model's own logits, image by image
    z = rows["logit"].to_numpy()
    np.testing.assert_allclose(rows["calibrated_probability"], M.sigmoid(0.6 * z - 0.4), rtol=0, atol=1e-12)
    margin = np.abs(z / 1.7 - M.logit(0.4) / 1.7)
    np.testing.assert_allclose(rows["uncertainty_margin"], margin, rtol=0, atol=1e-12)
    assert (rows["refer"] == (margin < 0.3)).all() and (rows["called_melanoma"] == (M.sigmoid(z) >= 0.4)).all()
    metrics = json.loads((tmp_path / "scored" / "metrics.json").read_text())
    assert metrics["platt"] == [0.6, -0.4] and metrics["threshold"] == 0.4 and metrics["temperature"] == 1.7
    y = rows["label"].to_numpy()
    assert metrics["ece_platt"] == pytest.approx(M.ece(y, M.sigmoid(0.6 * z - 0.4)), abs=1e-9)
    assert metrics["threshold_source"] == "sidecar"


@pytest.mark.realdata
@pytest.mark.parametrize("results", ["reference_ham10000", "tiny_student"])
def test_the_committed_tiny_student_is_the_model_its_sidecar_and_evaluation_describe(ham_root, results):
    """results/reference_ham10000 (distilled) and results/tiny_student (no teacher): each tiny student is flashable
    on a 512 KB-class board, and its evaluation is of this file on its holdout."""
    import hashlib

    from melanoma_tf.tflite import TFLiteModel

    folder = REPO / "results" / results
    model = folder / "tiny_student_int8.tflite"
    sidecar = json.loads((folder / "tiny_student_int8.json").read_text())
    evaluation = json.loads((folder / "tiny_student_int8_eval.json").read_text(), parse_constant=_refuse_nan)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    assert sidecar["sha256"] == evaluation["model_sha256"] == digest
    assert sidecar["size_bytes"] == model.stat().st_size <= 512 * 1024
    assert 0 < sidecar["tflm_arena_bytes"] <= 256 * 1024
    assert sidecar["model"] == evaluation["model"] == model.name and "/" not in evaluation["run"]
    taught = "distill_mobilenetv3_tiny.yaml" in sidecar["source_run"]
    assert taught == (results == "reference_ham10000")  # the reference run's is distilled, the other is not
    splits = pd.read_csv(folder / "splits.csv")
    holdout = splits[splits["split"] == "holdout"]
    assert len(holdout) == evaluation["n_images"] and int(holdout["label"].sum()) == evaluation["n_melanoma"]
    images = load_images([str(ham_root / "images" / f"{i}.jpg") for i in holdout["image_id"]], sidecar["input_size"])
    z = TFLiteModel(model).predict(images).reshape(-1)
    assert M.roc_auc(holdout["label"].to_numpy(), z) == pytest.approx(evaluation["roc_auc"], abs=1e-9)
    decided = z >= sidecar["threshold_logit"]
    assert decided[holdout["label"].to_numpy() == 1].mean() == pytest.approx(evaluation["sensitivity"], abs=1e-9)
