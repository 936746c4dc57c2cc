"""evaluate / report compare / baselines end to end on a tiny trained run."""

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
    from melanoma_tf import report

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
    assert report.main(["compare", str(tiny_run), str(out), "--out", str(tmp_path / "cmp")]) == 0
    table = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert set(table["model"]) >= {"baseline_logreg", "baseline_hgb", "baseline_rf"}
    assert len(table) == 4
    for png in ("roc.png", "auc_vs_size.png", "auc_vs_latency.png"):
        assert (tmp_path / "cmp" / png).is_file()
    assert report.main(["compare", str(tmp_path / "nothing")]) == 2
