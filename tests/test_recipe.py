"""The fine-tuning recipe's parts: shades-of-grey colour constancy in the model, a lower backbone learning rate,
an exponential moving average of the weights."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import REPO, tiny_overrides
from melanoma_tf import callbacks as cb
from melanoma_tf import config as C
from melanoma_tf import models
from melanoma_tf import quantize as Q
from melanoma_tf import train as T
from melanoma_tf.backend import keras, tf
from melanoma_tf.fit import Phase, ScaledAdam, phases_for, scheduled_optimizer
from melanoma_tf.tflite import TFLiteModel


def test_shades_of_grey_removes_a_colour_cast_up_to_brightness():
    rng = np.random.default_rng(0)
    image = rng.uniform(20, 200, (1, 24, 24, 3)).astype(np.float32)
    cast = image * np.array([1.2, 1.0, 0.75], np.float32)  # a warm light, nothing clipped
    layer = models.ShadesOfGrey()
    plain, corrected = layer(image).numpy(), layer(cast).numpy()
    ratio = corrected / plain  # one number for every pixel and channel: the cast is gone, brightness may differ
    assert np.allclose(ratio, ratio.mean(), rtol=1e-4)
    # the corrected image's channels have equal Minkowski means (a grey illuminant)
    norms = np.mean((corrected / 255.0) ** 6, axis=(0, 1, 2)) ** (1 / 6)
    assert np.allclose(norms, norms.mean(), rtol=1e-3)
    assert not np.allclose(np.mean((cast / 255.0) ** 6, axis=(0, 1, 2)) ** (1 / 6), norms.mean(), rtol=1e-2)


def test_colour_constancy_is_part_of_the_exported_model(tmp_path):
    student_cfg = C.StudentConfig(minimalistic=True, alpha=0.75)
    model = models.build_student(student_cfg, 32, colour_constancy="shades_of_grey")
    assert model.layers[1].name == "shades_of_grey"
    assert "shades_of_grey" not in [layer.name for layer in models.build_student(student_cfg, 32).layers]
    models.save_model(model, tmp_path / "model.keras")
    loaded = models.load_model(tmp_path / "model.keras")
    images = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    expected = model(images, training=False).numpy()
    assert np.allclose(loaded(images, training=False).numpy(), expected, atol=1e-5)
    (tmp_path / "m.tflite").write_bytes(Q.convert(loaded, "fp32"))
    tflite = TFLiteModel(tmp_path / "m.tflite")
    assert np.allclose(tflite.predict(images), expected, atol=1e-4)
    # integer TFLite has no kernels for it: quantize says so, naming the run, before any work
    C.save(C.from_dict({"data": {"colour_constancy": "shades_of_grey"}}), tmp_path / "config.yaml")
    with pytest.raises(C.ConfigError, match=r"shades_of_grey.*\['int8', 'qat'\]"):
        Q.quantize_run(tmp_path, modes=("fp16", "int8", "qat"))


def test_backbone_steps_are_scaled_head_steps_are_not():
    student = models.build_student(C.StudentConfig(minimalistic=True, alpha=0.75), 32)
    backbone = models.backbone_variables(student)
    head = student.get_layer("logits").trainable_weights
    assert {id(v) for v in backbone}.isdisjoint({id(v) for v in head})
    assert len(backbone) + len(head) == len(student.trainable_weights)

    images = np.random.default_rng(2).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(student(images, training=False)))
    grads = tape.gradient(loss, student.trainable_weights)
    start = [v.numpy() for v in student.trainable_weights]
    steps = {}
    for name, optimizer in (("plain", keras.optimizers.Adam(1e-3)),
                            ("scaled", ScaledAdam(1e-3).scale_steps(backbone, 0.1))):
        for v, value in zip(student.trainable_weights, start):
            v.assign(value)
        optimizer.apply_gradients(zip(grads, student.trainable_weights))
        steps[name] = [v.numpy() - value for v, value in zip(student.trainable_weights, start)]
    is_head = [any(v is h for h in head) for v in student.trainable_weights]
    for plain, scaled, head_var in zip(steps["plain"], steps["scaled"], is_head):
        assert np.allclose(scaled, plain if head_var else 0.1 * plain, rtol=1e-3, atol=1e-9)
    assert any(np.abs(s).max() > 0 for s in steps["plain"])

    cfg = C.from_dict({"train": {"backbone_lr_scale": 0.2, "lr_schedule": "constant"}})
    (phase,) = phases_for("student", cfg)
    optimizer = scheduled_optimizer(cfg, phase, 10, student)
    assert len(optimizer._step_scales) == len(backbone) and set(optimizer._step_scales.values()) == {0.2}
    assert not hasattr(scheduled_optimizer(cfg, Phase("train", 1, 1e-3), 10, student), "_step_scales")
    for layer in student.layers:  # a frozen backbone (a teacher's head phase): nothing to scale
        layer.trainable = layer.name in models.HEAD_LAYERS
    assert not hasattr(scheduled_optimizer(cfg, phase, 10, student), "_step_scales")
    with pytest.raises(C.ConfigError, match="train.backbone_lr_scale"):
        C.from_dict({"train": {"backbone_lr_scale": 0}})


def test_a_teacher_can_have_its_own_backbone_learning_rate():
    """``teacher.backbone_lr_scale`` overrides ``train.backbone_lr_scale`` for the teacher stage only."""
    cfg = C.from_dict({"train": {"backbone_lr_scale": 0.3}, "teacher": {"backbone_lr_scale": 1.0}})
    assert [p.backbone_lr_scale for p in phases_for("teacher", cfg)] == [1.0]
    assert [p.backbone_lr_scale for p in phases_for("student", cfg)] == [0.3]
    assert [p.backbone_lr_scale for p in phases_for("distill", cfg)] == [0.3]
    inherited = C.from_dict({"train": {"backbone_lr_scale": 0.3},
                             "teacher": {"mode": "frozen", "finetune_blocks": 2, "finetune_epochs": 1}})
    assert [(p.name, p.backbone_lr_scale) for p in phases_for("teacher", inherited)] == [("head", 0.3),
                                                                                          ("finetune", 0.3)]
    with pytest.raises(C.ConfigError, match="teacher.backbone_lr_scale"):
        C.from_dict({"teacher": {"backbone_lr_scale": -1}})


def test_weight_average_follows_the_decay_with_warm_up():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="d")(inputs))
    w0 = [w.copy() for w in model.get_weights()]
    average = cb.WeightAverage(model, decay=0.99)
    w1 = [w + 1.0 for w in w0]
    model.set_weights(w1)
    average.on_train_batch_end(0)  # step 0: decay min(0.99, 1/10) = 0.1
    assert all(np.allclose(a, 0.1 * b + 0.9 * c) for a, b, c in zip(average.average.get_weights(), w0, w1))
    before = average.average.get_weights()
    average.on_train_batch_end(1)  # step 1: decay 2/11
    d = 2 / 11
    assert all(np.allclose(a, d * b + (1 - d) * c) for a, b, c in zip(average.average.get_weights(), before, w1))


def test_a_run_with_weight_averaging_exports_and_resumes_the_average(synthetic_root, tmp_path):
    overrides = tiny_overrides(synthetic_root, tmp_path, **{"train.epochs": 1, "train.ema_decay": 0.9,
                                                            "train.steps_per_epoch": 3})
    cfg = C.load(REPO / "configs" / "student_mobilenetv3.yaml", overrides)
    run_dir = T.run(cfg)
    state = json.loads((run_dir / "state.json").read_text())
    exported = models.load_model(run_dir / "model.keras").get_weights()
    live = models.build_student(cfg.student, 32)
    average = cb.WeightAverage(live, 0.9)
    checkpoint = tf.train.Checkpoint(model=live, extras=average.trackable())  # as EpochCheckpoint saves it
    checkpoint.restore(str(run_dir / "checkpoints" / state["checkpoint"])).expect_partial()
    assert int(average.steps.numpy()) == 3
    assert all(np.array_equal(a, b) for a, b in zip(exported, average.average.get_weights()))
    assert any(not np.allclose(a, b) for a, b in zip(exported, live.get_weights()))
    assert json.loads((run_dir / "metrics.json").read_text())["val_roc_auc"] is not None


def test_a_killed_run_resumes_its_weight_average_where_it_was(synthetic_root, tmp_path, monkeypatch):
    """Train 2 epochs, roll back to epoch 1 as after a kill, resume: the resumed epoch's first averaging step
    starts from the epoch-1 average and its step count, not from the student's weights (a fresh average)."""
    overrides = tiny_overrides(synthetic_root, tmp_path, **{"train.epochs": 2, "train.ema_decay": 0.9,
                                                            "train.steps_per_epoch": 3, "train.lr_schedule": "constant"})
    cfg = C.load(REPO / "configs" / "student_mobilenetv3.yaml", overrides)
    run_dir = T.run(cfg)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["epoch"] == 2 and len(list((run_dir / "checkpoints").glob("epoch-1.index"))) == 1
    # The epoch-1 average, as its checkpoint holds it.
    saved = cb.WeightAverage(models.build_student(cfg.student, 32), 0.9)
    tf.train.Checkpoint(model=models.build_student(cfg.student, 32), extras=saved.trackable()).restore(
        str(run_dir / "checkpoints" / "epoch-1")).expect_partial()
    assert int(saved.steps.numpy()) == 3
    state.update(epoch=1, checkpoint="epoch-1", history=state["history"][:1])
    state.pop("stopped_phase", None)
    (run_dir / "state.json").write_text(json.dumps(state))
    (run_dir / "metrics.json").unlink()

    seen = []
    original = cb.WeightAverage.on_train_batch_end

    def spy(self, batch, logs=None):
        if not seen:  # the first step after the resume, before it is averaged in
            seen.append((int(self.steps.numpy()), self.average.get_weights()))
        return original(self, batch, logs)

    monkeypatch.setattr(cb.WeightAverage, "on_train_batch_end", spy)
    T.run(cfg, run_dir=run_dir)
    steps, weights = seen[0]
    assert steps == 3  # the count went on from the checkpoint (a fresh average starts at 0)
    assert all(np.array_equal(a, b) for a, b in zip(weights, saved.average.get_weights()))
    final = json.loads((run_dir / "state.json").read_text())
    assert final["epoch"] == 2 and len(final["history"]) == 2


def test_recipe_ablation_table_keeps_the_rows_it_did_not_rerun(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import recipe_ablation as RA

    scores = {"val_roc_auc": 0.5, "holdout_roc_auc": 0.6, "holdout_ci": [0.55, 0.65], "n_holdout": 10}
    calls = []

    def fake_run(config, overrides, folder):
        calls.append((folder.name, overrides))
        return dict(scores)

    monkeypatch.setattr(RA, "run_one", fake_run)
    results = tmp_path / "ablation.md"
    argv = ["--config", "configs/reference_ham10000.yaml", "--out", str(tmp_path / "runs"), "--results", str(results)]
    assert RA.main(argv + ["--choices", "baseline,ema 0.99"]) == 0
    assert calls == [("baseline-split", []), ("baseline-rosendahl", ["data.holdout_source=rosendahl"]),
                     ("ema_099-split", ["train.ema_decay=0.99"]),
                     ("ema_099-rosendahl", ["train.ema_decay=0.99", "data.holdout_source=rosendahl"])]
    scores.update(val_roc_auc=0.7)
    assert RA.main(argv + ["--choices", "7-class labels,baseline"]) == 0
    rows = [line for line in results.read_text().splitlines() if line.startswith("| ") and "choice" not in line]
    # every row in CHOICES order; the rerun ones replaced, the other one kept as it was
    assert [row.split(" | ")[0] for row in rows] == ["| baseline", "| ema 0.99", "| 7-class labels"]
    assert rows[0].startswith("| baseline | 0.700 | 0.700 | 0.600 [0.550, 0.650] (n=10)")
    assert rows[1].startswith("| ema 0.99 | 0.500 ")
    assert calls[-1] == ("baseline-rosendahl", ["data.holdout_source=rosendahl"])
    # a table made with other overrides is not merged with this one
    assert RA.main(argv + ["--choices", "baseline", "--set", "data.image_size=128"]) == 0
    assert [line.split(" | ")[0] for line in results.read_text().splitlines()
            if line.startswith("| ") and "choice" not in line] == ["| baseline"]
    assert RA.main(argv + ["--choices", "nonsense"]) == 2
    assert "unknown ['nonsense']" in capsys.readouterr().err
