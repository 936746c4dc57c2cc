"""tools/probe_yardstick.py: a frozen trunk's features extracted once, a logistic head per held-out clinic."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from melanoma_tf import metrics as M
from melanoma_tf import models
from melanoma_tf import synthetic
from melanoma_tf.pipeline import load_images

sys.path.insert(0, str(REPO / "tools"))
import probe_yardstick as P  # noqa: E402

CLINICS = ["clinic_a", "clinic_b"]


@pytest.fixture(scope="module")
def clinic_data(tmp_path_factory):
    """Two clinics of synthetic lesions and an external set made with another seed."""
    base = tmp_path_factory.mktemp("probe")
    root = synthetic.generate(base / "data", n_lesions=100, melanoma_fraction=0.4, image_size=40, seed=5)
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    lesions = sorted(meta["lesion_id"].unique())
    meta["clinic"] = meta["lesion_id"].map({lesion: CLINICS[i % 2] for i, lesion in enumerate(lesions)})
    meta.to_csv(root / "HAM10000_metadata.csv", index=False)
    ext = synthetic.generate(base / "ext", n_lesions=40, melanoma_fraction=0.3, image_size=40, seed=6)
    ext_meta = pd.read_csv(ext / "HAM10000_metadata.csv")
    ext_meta.assign(label=(ext_meta["dx"] == "mel").astype(int))[["image_id", "label"]].to_csv(
        ext / "labels.csv", index=False)
    return root, ext


def _args(root, ext, out):
    sets = [f"data.root={root}", "data.image_size=32", "data.source_column=clinic", "teacher.arch=mobilenet_v2",
            "teacher.weights=null", "teacher.bn_reestimate_images=0",
            f"data.external=[{{name: isic2017, images: {ext / 'images'}, labels: {ext / 'labels.csv'}}}]"]
    return (["--config", str(REPO / "configs" / "teacher_resnet152_resmem.yaml"), "--clinics", ",".join(CLINICS),
             "--reported", "", "--out", str(out)] + [a for s in sets for a in ("--set", s)])


def test_each_clinic_gets_a_head_whose_model_scores_as_reported_and_features_resume(clinic_data, tmp_path, capsys):
    root, ext = clinic_data
    out = tmp_path / "probe"
    assert P.main(_args(root, ext, out)) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"probe: {out}"
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    summary = json.loads((out / "yardstick.json").read_text())
    aucs = []
    for clinic in CLINICS:
        run = out / clinic / "seed1"
        predictions = pd.read_csv(run / "eval_holdout" / "predictions.csv")
        assert set(predictions["image_id"]) == set(meta.loc[meta["clinic"] == clinic, "image_id"])
        metrics = json.loads((run / "eval_holdout" / "metrics.json").read_text())
        assert metrics["roc_auc"] == pytest.approx(M.roc_auc(predictions["label"], predictions["probability"]))
        assert metrics["probe"]["C"] in P.C_GRID and "isic2017" in metrics["external"]
        aucs.append(metrics["roc_auc"])
        # The saved teacher computes the logits the table was made from (the head written into the model).
        model = models.load_model(run / "model.keras")
        head = predictions.head(12)
        images = load_images([str(root / "images" / f"{i}.jpg") for i in head["image_id"]], 32)
        np.testing.assert_allclose(model.predict(images, verbose=0).ravel(), head["logit"], rtol=1e-3, atol=1e-3)
        assert "holdout_source: clinic_a" in (out / "clinic_a" / "seed1" / "config.yaml").read_text()
    assert summary["loco_mean"]["mean"] == pytest.approx(np.mean(aucs))
    assert str(tmp_path) not in (out / "yardstick.json").read_text()

    # Features are extracted once: a second run reads every chunk (one damaged chunk is computed again).
    chunks = sorted((out / "features").glob("*/training_*.npz"))
    stamps = {p: p.stat().st_mtime_ns for p in chunks}
    chunks[0].write_bytes(b"cut")
    assert P.main(_args(root, ext, out) + ["--results", str(tmp_path / "results")]) == 0
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["runs.csv", "yardstick.json", "yardstick.md"]
    assert all(p.stat().st_mtime_ns == stamps[p] for p in chunks[1:]) and chunks[0].stat().st_size > 100
    assert json.loads((out / "yardstick.json").read_text())["loco_mean"]["mean"] == pytest.approx(
        summary["loco_mean"]["mean"], abs=1e-4)
    # Another trunk (here another resolution) extracts its own features beside these.
    assert P.main(_args(root, ext, out) + ["--set", "data.image_size=40"]) == 0
    assert len(list((out / "features").iterdir())) == 2


def test_the_blend_with_students_needs_their_held_out_predictions(tmp_path):
    with pytest.raises(P.ProbeError, match="no clinic_a/seed\\*/eval_holdout/predictions.csv"):
        out = tmp_path / "probe"
        (out / "clinic_a" / "seed1" / "eval_holdout").mkdir(parents=True)
        pd.DataFrame({"image_id": ["a"], "label": [1], "logit": [0.3]}).to_csv(
            out / "clinic_a" / "seed1" / "eval_holdout" / "predictions.csv", index=False)
        P.ensemble_table(out, tmp_path / "students", ["clinic_a"], 0.25)
