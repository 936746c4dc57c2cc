"""Relational distillation end to end: configs, the two-view pipeline, a tiny run, resume and the analysis."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, tiny_overrides
from melanoma_tf import config as C
from melanoma_tf import train as T
from melanoma_tf.config import ConfigError
from melanoma_tf.distill.teachers import load_teacher

RELATIONAL = {"stages": "[distill]", "distill.method": "relational", "data.labels": "multiclass",
              "distill.temperature": 1.0, "relational.ccd_weight": 0.1, "relational.ccd_weight_after": 0.01,
              "relational.crp_weight": 1.0, "relational.rampup_epochs": 1, "relational.k_pos": 4,
              "relational.k_neg": 64, "relational.feat_dim": 16}


def test_shipped_crckd_configs_load_with_their_base():
    rows = {p.stem: C.load(p) for p in sorted((REPO / "configs").glob("crckd_*.yaml"))}
    rows["distill_crckd"] = C.load(REPO / "configs" / "distill_crckd.yaml")
    assert len(rows) == 14
    full = rows["distill_crckd"].relational
    assert (full.ccd_weight, full.ccd_weight_after, full.crp_weight, full.tau, full.k_pos, full.k_neg,
            full.feat_dim) == (0.1, 0.01, 1.0, 0.07, 20, 4096, 128)
    for setting, arch, mode in (("densenet121", "densenet121", "mean_teacher"),
                                ("mnv3", "mobilenet_v3_small", "fixed")):
        b2 = rows[f"crckd_{setting}_b2"]
        assert b2.student.arch == arch and b2.relational.teacher_mode == mode
        assert b2.relational.ccd_weight == b2.relational.crp_weight == 0 and b2.relational.kl_weight == 1.0
        assert rows[f"crckd_{setting}_b2_crd"].relational.crd_weight > 0
        assert rows[f"crckd_{setting}_b2_sp"].relational.sp_weight > 0
        assert rows[f"crckd_{setting}_b2_fitnet"].relational.fitnet_weight > 0
        assert rows[f"crckd_{setting}_b2_crp"].relational.ccd_weight == 0
        assert rows[f"crckd_{setting}_b2_crp"].relational.crp_weight == 1.0
    assert rows["crckd_mnv3_full"].data.image_size == 128  # the base's other keys stay
    assert rows["crckd_mnv3_b2"].data.labels == "multiclass"


def test_config_base_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        C.load(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml.*the base of"):
        C.load(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: e.yaml\ntrain: {epochs: 3}\n")
    (tmp_path / "e.yaml").write_text("train: {epochs: 9, lr: 0.5}\nstudent: {dropout: 0.4}\n")
    cfg = C.load(tmp_path / "d.yaml")
    assert (cfg.train.epochs, cfg.train.lr, cfg.student.dropout) == (3, 0.5, 0.4)


def test_relational_config_errors():
    with pytest.raises(ConfigError, match="teacher_outputs"):
        C.from_dict({"stages": ["distill"], "distill": {"method": "relational", "teacher_outputs": "cached"}})
    with pytest.raises(ConfigError, match="ensemble"):
        C.from_dict({"stages": ["distill"], "distill": {"method": "relational", "teacher": ["a", "b"]},
                     "relational": {"teacher_mode": "fixed"}})
    with pytest.raises(ConfigError, match="relational.tau"):
        C.from_dict({"relational": {"tau": 0}})
    with pytest.raises(ConfigError, match="relational.crp_weight"):
        C.from_dict({"relational": {"crp_weight": -1}})
    # The mean teacher needs no trained teacher; a fixed one does.
    C.from_dict({"stages": ["distill"], "distill": {"method": "relational"}})
    with pytest.raises(ConfigError, match="distill.teacher"):
        C.from_dict({"stages": ["distill"], "distill": {"method": "relational"},
                     "relational": {"teacher_mode": "fixed"}})


def test_two_views_and_indices(synthetic_root):
    from melanoma_tf.pipeline import build_augmenter, make_dataset
    from melanoma_tf.config import AugmentConfig

    paths = sorted(str(p) for p in synthetic_root.rglob("*.jpg"))[:10]
    ds = make_dataset(paths, np.arange(10) % 2, 32, 4, training=True, augmenter=build_augmenter(AugmentConfig(), 0),
                      seed=0, with_index=True, two_views=True, cache="none")
    seen = []
    for inputs, y, w in ds:
        assert set(inputs) == {"image", "image_teacher", "index"}
        assert inputs["image"].shape == inputs["image_teacher"].shape
        assert not np.allclose(inputs["image"].numpy(), inputs["image_teacher"].numpy())
        np.testing.assert_array_equal(y.numpy().reshape(-1), inputs["index"].numpy() % 2)  # index follows its image
        seen += inputs["index"].numpy().tolist()
    assert sorted(seen) == list(range(10))
    plain = make_dataset(paths, np.zeros(10), 32, 4, with_index=True, two_views=True, cache="none")
    inputs, _, _ = next(iter(plain))
    np.testing.assert_array_equal(inputs["image"].numpy(), inputs["image_teacher"].numpy())  # no augmenter


@pytest.mark.slow
def test_relational_run_resume_and_relation_analysis(synthetic_root, tmp_path, caplog):
    overrides = tiny_overrides(synthetic_root, tmp_path, **RELATIONAL, **{"relational.sp_weight": 1.0})
    cfg = C.load(REPO / "configs" / "student_mobilenetv3.yaml", overrides)
    run_dir = T.run(cfg)
    history = pd.read_csv(run_dir / "history.csv")
    assert len(history) == 2
    assert {"kl_loss", "ccd_loss", "crp_loss", "sp_loss", "lambda_kl", "lambda_ccd"} <= set(history.columns)
    assert history["lambda_kl"].tolist() == pytest.approx([np.exp(-5), 1.0])
    assert history["lambda_ccd"].tolist() == pytest.approx([0.1, 0.01])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"val_acc", "val_bma", "val_f1", "val_pr_auc"} <= set(metrics)
    # The exported student is a plain model: no projection heads, no mean teacher.
    from melanoma_tf.models import load_model

    student = load_model(run_dir / "model.keras")
    assert student.output_shape == (None, 7)
    assert not any(layer.name.startswith(("proj_", "mean_teacher")) for layer in student.layers)

    # Resume from the epoch-1 checkpoint as after a kill: banks, heads and mean teacher come back.
    state = json.loads((run_dir / "state.json").read_text())
    state.update(epoch=1, checkpoint="epoch-1", history=state["history"][:1])
    state.pop("stopped_phase", None)
    (run_dir / "state.json").write_text(json.dumps(state))
    (run_dir / "metrics.json").unlink()
    first_epoch = history.iloc[0].copy()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="melanoma_tf.train"):
        T.run(cfg, run_dir=run_dir)
    assert "from epoch 1" in caplog.text and "resuming" in caplog.text  # not trained again from scratch
    resumed = pd.read_csv(run_dir / "history.csv")
    assert len(resumed) == 2
    # Epoch 1 was restored, not retrained: its row is the one written before the kill, to the last digit.
    pd.testing.assert_series_equal(resumed.iloc[0], first_epoch, check_names=False)

    # QAT of a mean-teacher run distils from the run's own EMA teacher, which training saves beside the
    # student (it used to look for <run>/../teacher/model.keras, which such a run never writes)
    from melanoma_tf import quantize as Q
    from melanoma_tf.models import load_model as load

    plan = Q.qat_plan(cfg, run_dir)
    teacher_files, source = plan.teacher_files, plan.description
    assert teacher_files == [run_dir / "mean_teacher.keras"] and "mean teacher" in source
    ema = load(run_dir / "mean_teacher.keras")
    assert ema.output_shape == (None, 7)
    assert any(not np.allclose(a, b) for a, b in zip(ema.get_weights(), student.get_weights()))
    qat = Q.qat_finetune(load(run_dir / "model.keras"), cfg, run_dir, tmp_path / "qat", epochs=1, lr=1e-4)
    assert (tmp_path / "qat" / "teacher_logits.npz").is_file() and qat.output_shape == (None, 7)
    (run_dir / "mean_teacher.keras").unlink()
    with pytest.raises(ConfigError, match="mean-teacher run without its teacher"):
        Q.qat_plan(cfg, run_dir)
    # a fixed-teacher relational run: QAT distils from that teacher, said so, not silently plain KD
    fixed = C.replace(C.replace(cfg, "distill.teacher", (str(run_dir / "model.keras"),)),
                      "relational.teacher_mode", "fixed")
    plan = Q.qat_plan(fixed, run_dir)
    teacher_files, source = plan.teacher_files, plan.description
    assert teacher_files == [run_dir / "model.keras"] and "relational run's fixed teacher" in source

    from melanoma_tf import evaluation as E

    report = E.evaluate(str(run_dir), n_boot=10, gradcam=0, latency_runs=5)
    result = json.loads((report.parent / "metrics.json").read_text())
    assert (report.parent / "relation_matrix.png").is_file()
    assert result["relation"]["rd"] == pytest.approx(result["relation"]["intra"] / result["relation"]["inter"])
    assert "ap" in result["multiclass"] and "Rd =" in report.read_text()


def test_ensemble_teacher_averages_member_logits(tmp_path):
    from melanoma_tf.backend import keras
    from melanoma_tf.models import save_model

    paths = []
    for i, size in enumerate((8, 12)):
        image = keras.Input((size, size, 3), name="image")
        x = keras.layers.GlobalAveragePooling2D()(image)
        model = keras.Model(image, keras.layers.Dense(1, name="logits")(x), name="teacher")
        model.get_layer("logits").set_weights([np.full((3, 1), i + 1.0, np.float32), np.zeros(1, np.float32)])
        paths.append(tmp_path / f"m{i}.keras")
        save_model(model, paths[-1])
    ensemble = load_teacher(paths, 8)
    images = np.full((2, 8, 8, 3), 2.0, np.float32)
    # Member 0: 3 channels x 2.0 x 1 = 6; member 1 (resized 8 -> 12, constant image): 3 x 2.0 x 2 = 12.
    np.testing.assert_allclose(ensemble(images).numpy(), 9.0, rtol=1e-5)
    with pytest.raises(ConfigError, match="output sizes"):
        image = keras.Input((8, 8, 3))
        other = keras.Model(image, keras.layers.Dense(7)(keras.layers.GlobalAveragePooling2D()(image)))
        save_model(other, tmp_path / "seven.keras")
        load_teacher([paths[0], tmp_path / "seven.keras"], 8)
