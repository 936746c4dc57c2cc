"""The phone's model against the int8 student on a yardstick: every seed converted, the ensemble scored, paired."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from melanoma_tf import metrics as M

sys.path.insert(0, str(REPO / "tools"))
import phone_yardstick as P  # noqa: E402

CLINICS = ["clinic_a", "clinic_b"]
SEEDS = [1, 2, 3]
NOISE = {"keras": 1.0, "fp16": 1.0, "int8": 1.4}  # int8: a noisier copy of the same model


def _logits(mode: str, clinic: int, seed: int, labels: np.ndarray) -> np.ndarray:
    shared = np.random.default_rng(1000 + clinic).normal(size=len(labels))  # what every seed gets wrong alike
    own = np.random.default_rng(10 * clinic + seed).normal(size=len(labels))  # what averaging seeds removes
    rounding = np.random.default_rng(77 + 10 * clinic + seed).normal(size=len(labels)) * (NOISE[mode] - 1.0)
    return 1.2 * labels + 0.5 * shared + own + rounding


def _fake_yardstick(root: Path, n: int = 150) -> Path:
    """A finished yardstick whose runs are already converted and scored (quantize need not run)."""
    (root / "plan.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "plan.json").write_text(json.dumps({"clinics": CLINICS, "seeds": SEEDS, "reported": []}))
    isic_labels = (np.random.default_rng(5).random(n) < 0.2).astype(int)
    for c, clinic in enumerate(CLINICS):
        labels = (np.random.default_rng(c).random(n) < 0.25).astype(int)
        for seed in SEEDS:
            run = root / clinic / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "config.yaml").write_text("stages: [student]\n")
            (run / "model.keras").write_bytes(b"kept")
            for mode, size in (("int8", 1000), ("fp16", 2000)):
                (run / "tflite").mkdir(exist_ok=True)
                (run / "tflite" / f"{mode}.tflite").write_bytes(b"\0" * (size + seed))
            for mode in ("keras", "int8", "fp16"):
                folder = run / "tflite" / f"eval_{mode}"
                for target, y, ids in ((folder, labels, [f"{clinic}_{i}" for i in range(n)]),
                                       (folder / "external" / "isic2017", isic_labels, [f"isic_{i}" for i in range(n)])):
                    target.mkdir(parents=True, exist_ok=True)
                    logit = _logits(mode, c if target == folder else 9, seed, y)
                    pd.DataFrame({"image_id": ids, "lesion_id": [f"L{i // 2}_{ids[0][:6]}" for i in range(n)],
                                  "label": y, "probability": 1 / (1 + np.exp(-logit)), "logit": logit}).to_csv(
                        target / "predictions.csv", index=False)
                (folder / "metrics.json").write_text(json.dumps({"roc_auc": 0.5}))
    return root


def test_the_phone_ensemble_is_scored_against_the_int8_student_on_the_same_images(tmp_path, monkeypatch):
    yardstick = _fake_yardstick(tmp_path / "yardstick")

    def no_conversion(*args, **kwargs):
        raise AssertionError("every run is scored already: nothing may be converted again")

    monkeypatch.setattr(subprocess, "run", no_conversion)
    out = tmp_path / "results" / "phone.md"
    assert P.main([str(yardstick), "--out", str(out), "--bootstrap", "200"]) == 0
    table = pd.read_csv(out.with_suffix(".csv"))
    rows = {(r["mode"], r["ensemble"]): r for r in table.to_dict("records")}
    int8, phone = rows[("int8", False)], rows[("fp16", True)]
    for c, clinic in enumerate(CLINICS):
        labels = pd.read_csv(yardstick / clinic / "seed1" / "tflite" / "eval_int8" / "predictions.csv")["label"]
        seeds = [_logits("int8", c, s, labels.to_numpy()) for s in SEEDS]
        assert int8[clinic] == pytest.approx(np.mean([M.roc_auc(labels, s) for s in seeds]))
        mean = np.mean([_logits("fp16", c, s, labels.to_numpy()) for s in SEEDS], axis=0)
        assert phone[clinic] == pytest.approx(M.roc_auc(labels, mean))  # the seeds' mean logit, as the app
    assert phone["loco_mean"] == pytest.approx(np.mean([phone[c] for c in CLINICS]))
    assert phone["loco_vs_int8"] == pytest.approx(phone["loco_mean"] - int8["loco_mean"])
    assert phone["loco_vs_int8_low"] > 0  # less noise and the seeds averaged: better on every resample
    assert np.isnan(int8["loco_vs_int8"])
    assert phone["size_mb"] == pytest.approx(3 * (2000 + 2) / 1e6) and int8["size_mb"] == pytest.approx(1002 / 1e6)
    assert np.isfinite(phone["isic2017_vs_int8"]) and phone["isic2017_low"] < phone["isic2017_mean"]
    text = out.read_text()
    assert "| fp16 ensemble of the seeds (the phone app's kind) |" in text and str(tmp_path) not in text


def test_a_yardstick_that_cannot_be_used_is_named(tmp_path, capsys):
    assert P.main([str(tmp_path / "nowhere")]) != 0
    assert "nowhere: no plan.json" in capsys.readouterr().err
    yardstick = _fake_yardstick(tmp_path / "yardstick")
    (yardstick / "clinic_b" / "seed2" / "model.keras").unlink()
    assert P.main([str(yardstick)]) != 0
    err = capsys.readouterr().err
    assert "clinic_b/seed2" in err and "not finished" in err and "Traceback" not in err
    (yardstick / "clinic_b" / "seed2" / "model.keras").write_bytes(b"kept")
    broken = yardstick / "clinic_a" / "seed3" / "tflite" / "eval_fp16" / "predictions.csv"
    pd.read_csv(broken).drop(columns="logit").to_csv(broken, index=False)
    assert P.main([str(yardstick)]) != 0
    err = capsys.readouterr().err
    assert "clinic_a/seed3/tflite/eval_fp16/predictions.csv: not the predictions" in err and "'logit'" in err
