"""The CRCKD 7-class table: out-of-fold BMA per method, paired intervals, the archive, bad sweeps refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn import metrics as skm

from conftest import REPO
from melanoma_tf import sweep as S

sys.path.insert(0, str(REPO / "tools"))
import crckd_table as C  # noqa: E402

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def _fake_sweep(root: Path, accuracy: dict[str, float], folds: int = 2, n: int = 300) -> Path:
    """A finished sweep: per method and fold, its validation images' predicted diagnoses (right ``accuracy``
    of the time, otherwise another class) and P(mel); every method scores the same images."""
    root.mkdir(parents=True)
    (root / "sweep.json").write_text(json.dumps({"axes": {"method": {m: {} for m in accuracy}}, "folds": folds}))
    truth = np.random.default_rng(0).integers(0, 7, n)
    for k, (method, right) in enumerate(accuracy.items()):
        rng = np.random.default_rng(k + 1)
        predicted = np.where(rng.random(n) < right, truth, (truth + rng.integers(1, 7, n)) % 7)
        frame = pd.DataFrame({"image_id": [f"ISIC_{i:05d}" for i in range(n)],
                              "lesion_id": [f"HAM_{i // 2:05d}" for i in range(n)], "label": truth,
                              "probability": np.clip((truth == 4) * right + rng.random(n) * 0.5, 0, 1),
                              "predicted_class": np.array(CLASSES)[predicted]})
        for fold in range(folds):
            folder = root / S.trial_id({"method": method}) / f"fold-{fold}" / "tflite" / "eval_val_keras"
            folder.mkdir(parents=True)
            frame[(np.arange(n) // 2) % folds == fold].to_csv(folder / "predictions.csv", index=False)
    return root


def test_the_table_pools_the_folds_and_pairs_every_method_with_the_baselines(tmp_path):
    sweep = _fake_sweep(tmp_path / "sweep", {"B1": 0.5, "B2": 0.6, "CRCKD": 0.7, "B1 again": 0.5})
    # "B1 again" predicts exactly what B1 predicts: a paired difference is then exactly zero on every resample
    b1 = sweep / S.trial_id({"method": "B1"})
    for fold in range(2):
        (sweep / S.trial_id({"method": "B1 again"}) / f"fold-{fold}" / "tflite" / "eval_val_keras" /
         "predictions.csv").write_text((b1 / f"fold-{fold}" / "tflite" / "eval_val_keras" /
                                        "predictions.csv").read_text())
    results = tmp_path / "results"
    assert C.main([str(sweep), "--results", str(results), "--bootstrap", "200"]) == 0
    table = pd.read_csv(results / "crckd.csv").set_index("method")
    assert list(table.index) == ["B1", "B2", "CRCKD", "B1 again"]  # the sweep's order
    pooled = pd.concat(pd.read_csv(p) for p in sweep.glob(f"{S.trial_id({'method': 'CRCKD'})}/fold-*/tflite/"
                                                          "eval_val_keras/predictions.csv"))
    expected = skm.balanced_accuracy_score(pooled["label"], pooled["predicted_class"].map(CLASSES.index))
    assert table.loc["CRCKD", "bma"] == pytest.approx(expected)
    assert table.loc["CRCKD", "bma_low"] < expected < table.loc["CRCKD", "bma_high"]
    assert table.loc["CRCKD", "vs_B1"] == pytest.approx(expected - table.loc["B1", "bma"])
    assert table.loc["CRCKD", "vs_B2"] == pytest.approx(expected - table.loc["B2", "bma"])
    assert 0 < table.loc["CRCKD", "vs_B1_low"] < table.loc["CRCKD", "vs_B1"] < table.loc["CRCKD", "vs_B1_high"]
    assert table.loc["B1 again", ["vs_B1", "vs_B1_low", "vs_B1_high"]].tolist() == [0.0, 0.0, 0.0]
    assert np.isnan(table.loc["B1", "vs_B1"]) and np.isnan(table.loc["B2", "vs_B2"])
    per_fold = [skm.balanced_accuracy_score(f["label"], f["predicted_class"].map(CLASSES.index))
                for f in (pd.read_csv(p) for p in sorted(sweep.glob(f"{S.trial_id({'method': 'CRCKD'})}/fold-*/"
                                                                    "tflite/eval_val_keras/predictions.csv")))]
    assert table.loc["CRCKD", "fold_bma_mean"] == pytest.approx(np.mean(per_fold))
    assert table.loc["CRCKD", "fold_bma_sd"] == pytest.approx(np.std(per_fold, ddof=1))
    text = (results / "crckd.md").read_text()
    assert "| CRCKD | " in text and "0.7807" in text and (results / "crckd_bma.png").stat().st_size > 1000
    assert str(tmp_path) not in text + (results / "images.csv").read_text()

    # On another machine: the archive alone writes the same table.
    (results / "crckd.csv").unlink()
    assert C.main(["--results", str(results), "--bootstrap", "200"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(results / "crckd.csv").set_index("method"), table)


def test_unfinished_unscored_or_unpaired_sweeps_are_refused_naming_the_run(tmp_path):
    sweep = _fake_sweep(tmp_path / "sweep", {"B1": 0.5, "B2": 0.6})
    run = sweep / S.trial_id({"method": "B2"}) / "fold-1"
    scored = run / "tflite" / "eval_val_keras" / "predictions.csv"
    frame = pd.read_csv(scored)
    frame.drop(columns="predicted_class").to_csv(scored, index=False)
    with pytest.raises(C.CrckdTableError, match=r"fold-1/tflite/eval_val_keras/predictions.csv: no "
                                                r"predicted_class column .* delete .*fold-1/tflite"):
        C.read_sweep(sweep)
    frame.iloc[1:].to_csv(scored, index=False)
    with pytest.raises(C.CrckdTableError, match=r"its folds hold other images than B1's"):
        C.read_sweep(sweep)
    scored.unlink()
    with pytest.raises(C.CrckdTableError, match=r"B2-.*/fold-1: not scored on its validation fold yet"):
        C.read_sweep(sweep)
    with pytest.raises(C.CrckdTableError, match=r"no sweep.json"):
        C.read_sweep(tmp_path)
    assert C.main(["--results", str(tmp_path / "nothing")]) == 2  # no archive: a named error, no traceback
    results = tmp_path / "results"
    C.save_archive(results, *C.read_sweep(_fake_sweep(tmp_path / "ok", {"B1": 0.5, "B2": 0.6})))
    images = pd.read_csv(results / "images.csv")
    images.iloc[1:].to_csv(results / "images.csv", index=False)
    with pytest.raises(C.CrckdTableError, match=r"B1/predicted is missing or does not have one value for each of "
                                                r"the 299 images"):
        C.load_archive(results)


@pytest.mark.slow
def test_a_real_multiclass_sweep_gives_the_table(tmp_path, synthetic_root):
    """The sweep's own folders (2 methods x 2 folds of a tiny 7-class student) are what the tool reads."""
    spec = {"base": str(REPO / "configs" / "student_mobilenetv3.yaml"),
            "set": [f"data.root={synthetic_root}", "data.image_size=32", "student.minimalistic=true",
                    "student.alpha=0.75", "train.epochs=1", "train.verbose=0", "data.augment.rotation=0.0",
                    "data.external=[]", "data.labels=multiclass"],
            "axes": {"method": {"bce": {"loss.name": "bce"}, "focal": {"loss.name": "focal"}}},
            "search": "grid", "folds": 2, "workers": 2, "metric": "val_bma", "output": str(tmp_path / "sweeps")}
    path = tmp_path / "sweep_mc.yaml"
    path.write_text(yaml.safe_dump(spec))
    root = S.run_sweep(S.load_sweep(path))
    results = tmp_path / "results"
    assert C.main([str(root), "--results", str(results), "--bootstrap", "50"]) == 0
    table = pd.read_csv(results / "crckd.csv").set_index("method")
    folds = pd.read_csv(root / "folds.csv")
    for method in ("bce", "focal"):  # the per-fold BMA is the sweep's own validation BMA of each fold model
        assert table.loc[method, "fold_bma_mean"] == pytest.approx(folds.loc[folds["method"] == method,
                                                                             "val_bma"].mean(), abs=1e-6)
    images = pd.read_csv(results / "images.csv")
    splits = pd.read_csv(root / S.trial_id({"method": "bce"}) / "fold-0" / "splits.csv")
    assert set(images["image_id"]) == set(splits.query("split != 'holdout'")["image_id"])
