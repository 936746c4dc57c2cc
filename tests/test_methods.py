"""One contract for every training method in ``melanoma_tf.distill.METHODS``, checked the same way for each.

Per method, at 32 px on synthetic data: two one-step epochs train and export the plain
student; the checkpoint restores the student and the method's own state (memory banks,
heads, EMA teacher) whatever the fresh model started from; a logit-KD run resumes; QAT of the trained run
continues with the teacher the method says, and the logits it distils from are that
teacher's. A new method needs its class and its line in ``METHODS``; settings it needs
to run at this size go in ``SETTINGS``.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from conftest import REPO, tiny_overrides
from melanoma_tf import callbacks as cb
from melanoma_tf import config as C
from melanoma_tf import metrics as M
from melanoma_tf import models, runs
from melanoma_tf import quantize as Q
from melanoma_tf import train as T
from melanoma_tf.backend import keras
from melanoma_tf.distill import METHODS, method_for
from melanoma_tf.distill.teachers import load_teacher, teacher_input_size
from melanoma_tf.pipeline import class_weights, load_images

# What a method needs to run on 128 synthetic training images (none: the defaults do).
SETTINGS = {
    "relational": {"relational.k_pos": 4, "relational.k_neg": 32, "relational.feat_dim": 8,
                   "relational.ccd_weight": 0.1, "relational.crp_weight": 1.0, "relational.sp_weight": 1.0,
                   "relational.rampup_epochs": 1},
}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A small random teacher at 40 px whose logits differ from image to image.

    Not a random deep network: its activations shrink layer by layer until every image gets the
    same logit to 1e-13, and which of two tied images ranks first is then floating-point noise.
    """
    keras.utils.set_random_seed(3)
    image = keras.Input((40, 40, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(image)
    x = keras.layers.Conv2D(8, 5, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    teacher = keras.Model(image, keras.layers.Dense(1, name="logits")(x), name="tiny_teacher")
    path = tmp_path_factory.mktemp("teacher") / "teacher.keras"
    models.save_model(teacher, path)
    return path


def method_config(name: str, root, out, teacher_file) -> C.Config:
    stage = {"stages": "[student]"} if name == "none" else {
        "stages": "[distill]", "distill.method": name, "distill.teacher": f"[{teacher_file}]"}
    overrides = tiny_overrides(root, out, **stage, **SETTINGS.get(name, {}), **{"train.steps_per_epoch": 1})
    return C.load(REPO / "configs" / "student_mobilenetv3.yaml", overrides)


def fresh_trainer(cfg: C.Config, stage: str, data, teacher_file, seed: int):
    """A new student and trainer of the method, with the optimizer built, from a given initialisation seed."""
    keras.utils.set_random_seed(seed)
    cfg = C.replace(cfg, "seed", seed)
    method = method_for(stage, cfg, [teacher_file])
    student = models.build_student(cfg.student, 32, cfg.num_outputs)
    labels = data.part("train")["label"].to_numpy()
    trainer = method.trainer(student, runs.loss_for(cfg, class_weights(labels, 2)), labels, method.build_teacher(32))
    extras, variables = method.checkpoint_state(trainer)
    optimizer = keras.optimizers.Adam(1e-3)
    trainer.compile(optimizer=optimizer)
    return method, student, trainer, optimizer, extras, variables


def method_state(trainer) -> list[np.ndarray]:
    """The method's own trained state: memory banks, projection heads, EMA teacher (empty for plain KD)."""
    values = [v.numpy() for v in getattr(trainer, "head_variables", lambda: [])()]
    for name in ("bank_s", "bank_t"):
        if hasattr(trainer, name):
            values.append(getattr(trainer, name).numpy())
    if getattr(trainer, "ema", None) is not None:
        values += trainer.ema.get_weights()
    return values


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_checkpoints_exports_and_quantizes(name, synthetic_root, teacher_file, tmp_path,
                                                               caplog):
    cfg = method_config(name, synthetic_root, tmp_path / "runs", teacher_file)
    stage = cfg.stages[-1]
    data = runs.prepare_data(cfg)
    folder = tmp_path / "stage"
    metrics = T.train_stage(stage, cfg, data, folder, [teacher_file])
    assert metrics["epochs_run"] == 2 and 0 <= metrics["val_roc_auc"] <= 1
    # A logit-KD stage says how its teacher scores on validation (at the teacher's resolution): the number
    # that decides whether distilling from it is worth it.
    assert ("teacher_val_roc_auc" in metrics) == (name == "kd")
    if name == "kd":
        val = data.part("val")
        z = load_teacher([teacher_file], 40).predict(load_images(val["path"].tolist(), 40), verbose=0)
        assert metrics["teacher_val_roc_auc"] == pytest.approx(M.roc_auc(val["label"].to_numpy(), z.reshape(-1)),
                                                               abs=1e-4)

    # The exported model is the plain student: same layers and parameters as a freshly built one.
    exported = models.load_model(folder / "model.keras")
    plain = models.build_student(cfg.student, 32, cfg.num_outputs)
    assert [layer.name for layer in exported.layers] == [layer.name for layer in plain.layers]
    assert exported.count_params() == plain.count_params()

    # The last checkpoint restores the student and the method's own state, from any initialisation.
    state = cb.load_state(folder)
    restored = []
    for seed in (1, 2):
        _, student, trainer, optimizer, extras, variables = fresh_trainer(cfg, stage, data, teacher_file, seed)
        before = [w.copy() for w in student.get_weights()]
        assert cb.restore_checkpoint(folder, state, student, optimizer, extras, variables)
        assert any(not np.array_equal(a, b) for a, b in zip(before, student.get_weights()))
        restored.append((student.get_weights(), method_state(trainer)))
    (weights_1, extra_1), (weights_2, extra_2) = restored
    assert all(np.array_equal(a, b) for a, b in zip(weights_1, weights_2))
    assert len(extra_1) == len(extra_2) and all(np.array_equal(a, b) for a, b in zip(extra_1, extra_2))
    assert bool(extra_1) == (name == "relational")

    # A killed run resumes from epoch 1 and finishes the second epoch only. (Resuming a student stage is
    # tested by killing a real run in test_train, a relational one in test_relational_train.)
    if name == "kd":
        first_epoch = dict(state["history"][0])
        state.update(epoch=1, checkpoint="epoch-1", history=state["history"][:1])
        state.pop("stopped_phase", None)
        (folder / "state.json").write_text(json.dumps(state))
        (folder / "metrics.json").unlink()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="melanoma_tf.train"):
            assert T.train_stage(stage, cfg, data, folder, [teacher_file], resume=True)["epochs_run"] == 2
        assert "resuming" in caplog.text and "from epoch 1" in caplog.text
        assert cb.load_state(folder)["history"][0] == first_epoch  # epoch 1 restored, not trained again

    # QAT continues with the method's teacher, and distils from that teacher's logits.
    plan = Q.qat_plan(cfg, folder)
    expected = {"none": None, "kd": [teacher_file], "relational": [folder / "mean_teacher.keras"]}
    assert plan.teacher_files == expected[name]
    if not plan.teacher_files:
        return  # QAT without a teacher: test_quantize's QAT of the real MobileNetV3-Small
    qat = Q.qat_finetune(models.load_model(folder / "model.keras"), cfg, folder, tmp_path / "qat", 1, 1e-4)
    assert qat.output_shape == (None, 1)
    saved = np.load(tmp_path / "qat" / "teacher_logits.npz")
    train = data.part("train").set_index("image_id").loc[saved["image_id"]]
    size = teacher_input_size(plan.teacher_files)  # logits are taken at the teacher's own resolution
    images = load_images(train["path"].tolist(), size)
    teacher = load_teacher(plan.teacher_files, size)
    assert np.allclose(saved["logits"], teacher.predict(images, verbose=0), atol=1e-4)
