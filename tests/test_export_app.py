"""melanoma_tf.export_app: the phone app's model files, their arithmetic, and what the page may claim."""

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, tiny_int8_flatbuffer
from melanoma_tf import export_app as EA
from melanoma_tf import metrics as M
from melanoma_tf.tflite import FlatbufferError, TFLiteModel, verify_flatbuffer

SIZE = 16


def _int8_model(folder, metrics_sha=None, external=True):
    """A tiny int8 model with its sidecar and an evaluation beside it, as quantize + evaluate leave them."""
    from melanoma_tf.quantize import flatbuffer_details

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "int8.tflite"
    path.write_bytes(tiny_int8_flatbuffer(SIZE))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    sidecar = {**flatbuffer_details(path), "model": "int8.tflite", "input_size": SIZE, "threshold": 0.3,
               "threshold_logit": float(M.logit(0.3)), "refer_margin_logit": 0.4, "temperature": 1.5,
               "calibration": {"method": "platt", "a": 0.8, "b": -0.5, "fitted_on": "validation"},
               "target_sensitivity": 0.95, "labels": "binary", "size_bytes": path.stat().st_size, "sha256": sha}
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    evaluation = {"roc_auc": 0.81, "roc_auc_ci": [0.7, 0.9], "sensitivity": 0.93, "specificity": 0.6,
                  "n_images": 120, "n_melanoma": 15, "split": "holdout", "threshold_source": "validation",
                  "model_sha256": metrics_sha or sha}
    if external:
        evaluation["external"] = {"isic2017": {"roc_auc": 0.64, "sensitivity": 0.7, "specificity": 0.45,
                                               "n_images": 50, "n_melanoma": 10, "folder": "external/isic2017"}}
    (folder / "eval_int8").mkdir(exist_ok=True)
    (folder / "eval_int8" / "metrics.json").write_text(json.dumps(evaluation))
    return path, sidecar


def test_float_interface_keeps_the_int8_arithmetic(tmp_path):
    path, _ = _int8_model(tmp_path)
    float_path = tmp_path / "float_io.tflite"
    float_path.write_bytes(EA.float_io_flatbuffer(path.read_bytes()))
    verify_flatbuffer(float_path)
    original, wrapped = TFLiteModel(path), TFLiteModel(float_path)
    assert wrapped.input_dtype == np.float32 and wrapped.output_dtype == np.float32
    images = np.random.default_rng(1).uniform(0, 255, (12, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_array_equal(wrapped.predict(images), original.predict(images))
    with pytest.raises(EA.ExportError, match="not int8"):
        EA.float_io_flatbuffer(float_path.read_bytes())


def test_static_batch_is_written_into_the_shape_signature(tmp_path):
    from ai_edge_litert import schema_py_generated as schema

    from melanoma_tf.backend import keras, tf

    inputs = keras.Input((SIZE, SIZE, 3))
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(inputs)))
    data = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    before = schema.ModelT.InitFromPackedBuf(bytearray(data), 0).subgraphs[0]
    assert list(before.tensors[before.inputs[0]].shapeSignature)[0] == -1  # what LiteRT.js refuses
    fixed = EA.static_batch_flatbuffer(data)
    after = schema.ModelT.InitFromPackedBuf(bytearray(fixed), 0).subgraphs[0]
    assert all(t.shapeSignature is None or list(t.shapeSignature)[:1] != [-1] for t in after.tensors)
    assert list(after.tensors[after.inputs[0]].shapeSignature) == [1, SIZE, SIZE, 3]
    (tmp_path / "a.tflite").write_bytes(data)
    (tmp_path / "b.tflite").write_bytes(fixed)
    x = np.random.default_rng(2).uniform(0, 255, (1, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_allclose(TFLiteModel(tmp_path / "b.tflite").predict(x),
                               TFLiteModel(tmp_path / "a.tflite").predict(x), rtol=1e-6)


def test_export_writes_a_model_the_app_can_check_and_what_the_page_shows(tmp_path):
    path, sidecar = _int8_model(tmp_path / "run" / "tflite")
    out = tmp_path / "app_model"
    assert EA.main(["--model", str(path), "--out", str(out)]) == 0
    written = json.loads((out / "model.json").read_text())
    data = (out / "model.tflite").read_bytes()
    assert written["sha256"] == hashlib.sha256(data).hexdigest() and written["size_bytes"] == len(data)
    assert written["input_dtype"] == written["output_dtype"] == "float32" and "input_scale" not in written
    assert written["derived_from"] == {"model": "int8.tflite", "sha256": sidecar["sha256"]}
    for key in ("threshold_logit", "refer_margin_logit", "temperature", "calibration", "input_size"):
        assert written[key] == sidecar[key]
    info = json.loads((out / "app.json").read_text())
    assert (info["models"], info["sidecar"]) == (["model.tflite"], "model.json")
    assert [s["name"] for s in info["tested_on"]] == ["HAM10000 holdout", "isic2017"]
    assert info["tested_on"][0]["sensitivity"] == 0.93 and info["tested_on"][1]["roc_auc"] == 0.64
    assert "folder" not in info["tested_on"][1]
    # the app's logits are the source model's
    images = np.random.default_rng(3).uniform(0, 255, (6, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_array_equal(TFLiteModel(out / "model.tflite").predict(images), TFLiteModel(path).predict(images))


def test_export_refuses_what_it_cannot_vouch_for(tmp_path, capsys):
    path, _ = _int8_model(tmp_path / "a", metrics_sha="0" * 64)
    with pytest.raises(EA.ExportError, match=r"eval_int8/metrics.json: evaluates model sha256 0000"):
        EA.export_app(path, tmp_path / "out")
    path, _ = _int8_model(tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "eval_int8")
    with pytest.raises(EA.ExportError, match="no evaluation found"):
        EA.export_app(path, tmp_path / "out")
    path.with_suffix(".json").unlink()
    assert EA.main(["--model", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "int8.tflite: no sidecar int8.json beside it" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.tflite").exists()
    path, _ = _int8_model(tmp_path / "c")
    path.write_bytes(path.read_bytes()[:-10])  # damaged after its sidecar was written
    assert EA.main(["--model", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "int8.tflite" in capsys.readouterr().err


def test_decision_and_probability_follow_evaluate():
    """The app's rule is evaluate's own: its predictions.csv rows (call, referral, calibrated probability), computed
    by evaluation._predictions for the same sidecar, on a grid of logits through the threshold and the band."""
    from melanoma_tf import evaluation

    sidecar = {"threshold": 0.3, "threshold_logit": float(M.logit(0.3)), "temperature": 1.5,
               "refer_margin_logit": 0.4, "calibration": {"method": "platt", "a": 0.8, "b": -0.5}}
    z = np.linspace(-4, 4, 801)
    result = {"threshold": sidecar["threshold"], "temperature": 1.5, "refer_margin_logit": 0.4, "platt": [0.8, -0.5]}
    frame = pd.DataFrame({"image_id": [f"i{k}" for k in range(len(z))], "lesion_id": "", "label": 0})
    rows = evaluation._predictions(frame, z, result)
    expected = np.where(rows["refer"], "refer", np.where(rows["called_melanoma"], "melanoma", "not_melanoma"))
    got = np.array([EA.decision(float(v), sidecar) for v in z])
    assert (got == expected).all(), {float(v): (g, e) for v, g, e in zip(z, got, expected) if g != e}
    assert {"refer", "melanoma", "not_melanoma"} == set(got)
    shown = np.array([EA.shown_probability(float(v), sidecar) for v in z])
    np.testing.assert_allclose(shown, rows["calibrated_probability"], rtol=0, atol=1e-12)
    assert EA.shown_probability(1.0, {"temperature": 2.0}) == pytest.approx(M.sigmoid(0.5))


def _float_model(folder, name, keras_model, extra=None):
    """A float flatbuffer of ``keras_model`` with its sidecar (and ``extra`` keys), as quantize writes them."""
    from melanoma_tf.backend import tf
    from melanoma_tf.quantize import flatbuffer_details

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(keras_model).convert())
    sidecar = {**flatbuffer_details(path), "model": path.name, "input_size": SIZE, "labels": "binary",
               "preprocessing": "RGB float in [0, 255]", "threshold": 0.3, "threshold_logit": float(M.logit(0.3)),
               "refer_margin_logit": 0.2, "temperature": 1.2, "calibration": {"method": "platt", "a": 0.9, "b": -0.1},
               "target_sensitivity": 0.95, "size_bytes": path.stat().st_size,
               "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), **(extra or {})}
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


def _members_and_ensemble(folder, n=3):
    """n tiny float members, their mean-logit ensemble (built by melanoma_tf.combine, as soup --ensemble does)
    with an evaluation beside it, and one model that is not a member."""
    from melanoma_tf.backend import keras
    from melanoma_tf.combine import mean_logit_model

    def member(seed):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((SIZE, SIZE, 3))
        x = keras.layers.Conv2D(4, 3, activation="relu")(keras.layers.Rescaling(1 / 127.5, -1)(inputs))
        return keras.Model(inputs, keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(x)))

    models = [member(seed) for seed in range(n + 1)]
    members = [_float_model(folder / f"m{k}", "fp16", model) for k, model in enumerate(models[:n])]
    ensemble = _float_model(folder / "ensemble", "fp16", mean_logit_model(models[:n]))
    (folder / "ensemble" / "eval_fp16").mkdir()
    (folder / "ensemble" / "eval_fp16" / "metrics.json").write_text(json.dumps(
        {"roc_auc": 0.8, "sensitivity": 0.95, "specificity": 0.5, "n_images": 40, "n_melanoma": 8,
         "split": "holdout", "model_sha256": json.loads(ensemble.with_suffix(".json").read_text())["sha256"]}))
    stranger = _float_model(folder / "stranger", "fp16", models[n])
    return ensemble, members, stranger


def test_an_ensemble_ships_as_its_members_and_the_app_computes_the_ensemble(tmp_path):
    ensemble, members, stranger = _members_and_ensemble(tmp_path)
    out = tmp_path / "app_model"
    out.mkdir()
    (out / "model.tflite").write_bytes(b"an earlier single-model export")
    assert EA.main(["--model", str(ensemble), "--members", *map(str, members), "--out", str(out)]) == 0
    info, sidecar, paths = EA.read_app_folder(out)
    assert info["models"] == ["member-1.tflite", "member-2.tflite", "member-3.tflite"] == [p.name for p in paths]
    assert not (out / "model.tflite").exists()  # the earlier export's file is gone, not shipped beside them
    assert sidecar["combine"] == "mean_logit" and "sha256" not in sidecar
    assert sidecar["derived_from"]["sha256"] == json.loads(ensemble.with_suffix(".json").read_text())["sha256"]
    for key in ("threshold_logit", "refer_margin_logit", "temperature", "calibration"):
        assert sidecar[key] == json.loads(ensemble.with_suffix(".json").read_text())[key]
    images = np.random.default_rng(5).uniform(0, 255, (8, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_allclose(EA.app_logits(out, images), TFLiteModel(ensemble).predict(images)[:, 0],
                               rtol=0, atol=1e-5)
    # a single model again: the members go
    shutil.copytree(tmp_path / "ensemble", tmp_path / "again")
    EA.export_app(tmp_path / "again" / "fp16.tflite", out)
    assert sorted(p.name for p in out.iterdir()) == ["app.json", "model.json", "model.tflite"]


def test_an_ensemble_export_refuses_files_that_are_not_its_members(tmp_path, capsys):
    ensemble, members, stranger = _members_and_ensemble(tmp_path)
    out = tmp_path / "app_model"
    with pytest.raises(EA.ExportError, match=r"differs from the ensemble's by up to .* not its members"):
        EA.export_app(ensemble, out, members=[*members[:2], stranger])
    with pytest.raises(EA.ExportError, match="differs from the ensemble's"):
        EA.export_app(ensemble, out, members=members[:2])  # one member short
    with pytest.raises(EA.ExportError, match="an ensemble has two or more"):
        EA.export_app(ensemble, out, members=members[:1])
    sidecar = json.loads(members[1].with_suffix(".json").read_text())
    members[1].with_suffix(".json").write_text(json.dumps({**sidecar, "input_size": 2 * SIZE}))
    assert EA.main(["--model", str(ensemble), "--members", *map(str, members), "--out", str(out)]) == 2
    assert f"{members[1].with_suffix('.json')}: input_size {2 * SIZE} is not the ensemble's {SIZE}" in \
        capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_a_damaged_app_folder_is_named(tmp_path):
    ensemble, members, _ = _members_and_ensemble(tmp_path, n=2)
    out = tmp_path / "app_model"
    EA.export_app(ensemble, out, members=members)
    good = (out / "member-2.tflite").read_bytes()
    (out / "member-2.tflite").write_bytes(good[:len(good) // 2])
    with pytest.raises(FlatbufferError, match=r"member-2.tflite: corrupt or cut-short"):
        EA.read_app_folder(out)
    (out / "member-2.tflite").write_bytes((out / "member-1.tflite").read_bytes())  # valid, but another member
    with pytest.raises(EA.ExportError, match=r"member-2.tflite: not the file .*model.json describes"):
        EA.read_app_folder(out)
    (out / "member-2.tflite").write_bytes(good)
    info = json.loads((out / "app.json").read_text())
    (out / "app.json").write_text(json.dumps({**info, "models": info["models"][:1]}))
    with pytest.raises(EA.ExportError, match=r"app.json: models \['member-1.tflite'\] are not the sidecar's"):
        EA.read_app_folder(out)


def test_the_committed_app_model_scores_what_its_page_claims(ham_root):
    """The app's committed model file(s), run as the app runs them (the members' mean logit for an ensemble),
    reproduce the holdout ROC-AUC, sensitivity and specificity app.json shows, on the same 1,199 images."""
    from melanoma_tf.pipeline import load_images

    root = ham_root
    folder = REPO / "app" / "public" / "model"
    info, sidecar, _ = EA.read_app_folder(folder)
    claimed = info["tested_on"][0]
    splits = pd.read_csv(REPO / "results" / "reference_ham10000" / "splits.csv")
    holdout = splits[splits["split"] == "holdout"]
    assert len(holdout) == claimed["n_images"]
    paths = [str(root / "images" / f"{image_id}.jpg") for image_id in holdout["image_id"]]
    z = EA.app_logits(folder, load_images(paths, int(sidecar["input_size"])))
    y = holdout["label"].to_numpy()
    assert int(y.sum()) == claimed["n_melanoma"]
    assert M.roc_auc(y, z) == pytest.approx(claimed["roc_auc"], abs=1e-4)
    called = z >= float(sidecar["threshold_logit"])
    assert called[y == 1].mean() == pytest.approx(claimed["sensitivity"], abs=1.01 / y.sum())
    assert (~called[y == 0]).mean() == pytest.approx(claimed["specificity"], abs=1.01 / (1 - y).sum())


def test_the_app_ships_the_phone_ensemble_the_results_describe():
    """app/public/model is export_app's output for the committed phone ensemble: its operating point and
    calibration, its evaluation on the page, and one member file per member."""
    results = REPO / "results" / "reference_ham10000"
    source = json.loads((results / "phone_ensemble_fp16.json").read_text())
    info, sidecar, paths = EA.read_app_folder(REPO / "app" / "public" / "model")
    assert sidecar["derived_from"]["sha256"] == source["sha256"] and sidecar["combine"] == "mean_logit"
    for key in ("threshold_logit", "refer_margin_logit", "temperature", "calibration", "input_size",
                "preprocessing", "target_sensitivity"):
        assert sidecar[key] == source[key], key
    assert len(paths) == 3 and all(p.stat().st_size < 5_000_000 for p in paths)
    expected = EA.app_info(results / "phone_ensemble_fp16_eval.json", source, EA.DEFAULT_TRAINED_ON)
    assert info == {**expected, "models": [p.name for p in paths]}
