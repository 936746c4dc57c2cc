"""The Distiller: loss composition against hand values, frozen teacher, cached logits, pipeline wiring."""

import math

import numpy as np
import pytest

from melanoma_tf import config as C
from melanoma_tf import losses as L
from melanoma_tf import models as M
from melanoma_tf.backend import keras, tf
from melanoma_tf.distill.kd import Distiller


class FixedLogits(keras.layers.Layer):
    """Returns a per-image logit stored in the image's first pixel (a teacher we can reason about)."""

    def call(self, x):
        return x[:, 0, 0, :1]


def fixed_teacher(size=8):
    image = keras.Input((size, size, 3))
    return keras.Model(image, FixedLogits()(image))


def sig(z):
    return 1 / (1 + math.exp(-z))


def test_compute_loss_hand_value():
    teacher = fixed_teacher()
    student = fixed_teacher()
    x = np.zeros((2, 8, 8, 3), np.float32)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 2.0, 0.0  # teacher logits (via the same layer) 2 and 0
    y = np.array([[1.0], [0.0]], np.float32)
    alpha, T = 0.3, 2.0
    d = Distiller(student, L.bce, teacher=teacher, alpha=alpha, temperature=T)
    y_pred = tf.constant([[0.0], [4.0]])  # student logits
    total = float(d.compute_loss(x, y, y_pred))
    student_term = (math.log(2) + math.log(1 + math.exp(4))) / 2
    kd = (-(sig(1) * math.log(0.5) + (1 - sig(1)) * math.log(0.5))
          - (0.5 * math.log(sig(2)) + 0.5 * math.log(1 - sig(2)))) / 2
    assert kd == pytest.approx(0.910038, abs=1e-6)
    assert total == pytest.approx(alpha * student_term + (1 - alpha) * T * T * kd, rel=1e-5)
    assert float(d.kd_loss_tracker.result()) == pytest.approx(kd, rel=1e-5)
    assert float(d.student_loss_tracker.result()) == pytest.approx(student_term, rel=1e-5)


def test_cached_logits_equal_online_teacher():
    teacher = fixed_teacher()
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype(np.float32)
    y = np.array([[1.0], [0.0], [1.0], [0.0]], np.float32)
    y_pred = tf.constant(np.random.default_rng(2).normal(size=(4, 1)).astype(np.float32))
    online = Distiller(fixed_teacher(), L.bce, teacher=teacher, alpha=0.5, temperature=3.0)
    offline = Distiller(fixed_teacher(), L.bce, teacher=None, alpha=0.5, temperature=3.0)
    cached = {"image": x, "teacher_logits": teacher.predict(x, verbose=0)}
    assert float(online.compute_loss(x, y, y_pred)) == pytest.approx(float(offline.compute_loss(cached, y, y_pred)),
                                                                     rel=1e-6)
    with pytest.raises(ValueError, match="teacher"):
        offline.compute_loss(x, y, y_pred)


def test_alpha_one_is_plain_training():
    d = Distiller(fixed_teacher(), L.bce, alpha=1.0)
    y, z = np.array([[1.0]], np.float32), tf.constant([[0.5]])
    assert float(d.compute_loss(np.zeros((1, 8, 8, 3), np.float32), y, z)) == pytest.approx(float(L.bce(y, z)))
    assert [m.name for m in d.metrics] == ["loss", "student_loss"]
    with pytest.raises(ValueError, match="alpha"):
        Distiller(fixed_teacher(), L.bce, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        Distiller(fixed_teacher(), L.bce, alpha=0.5, temperature=0.0)


def test_teacher_frozen_student_learns():
    keras.utils.set_random_seed(0)
    teacher = M.build_teacher(C.TeacherConfig(), 32)
    student = M.build_student(C.StudentConfig(minimalistic=True, alpha=0.75), 32)
    before_teacher = [w.numpy().copy() for w in teacher.weights]  # includes BN moving statistics
    before_student = [w.numpy().copy() for w in student.trainable_weights]
    d = Distiller(student, L.bce, teacher=teacher, alpha=0.5, temperature=2.0)
    d.compile(optimizer=keras.optimizers.Adam(1e-3))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 2, (16, 1)).astype(np.float32)
    history = d.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert {"loss", "student_loss", "kd_loss"} <= set(history.history)
    assert history.history["kd_loss"][0] > 0
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(before_teacher, teacher.weights))
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(before_student, student.trainable_weights))
    assert not teacher.trainable
    # call() returns the student's logits
    np.testing.assert_allclose(d(x[:2]).numpy(), student(x[:2]).numpy(), atol=1e-6)


def test_multiclass_distillation_uses_softmax_kd():
    d = Distiller(fixed_teacher(), L.softmax_ce, alpha=0.0, temperature=1.0, labels="multiclass")
    inputs = {"image": np.zeros((1, 8, 8, 3), np.float32), "teacher_logits": np.array([[1.0, 0.0]], np.float32)}
    value = float(d.compute_loss(inputs, np.array([0]), tf.constant([[0.0, 0.0]])))
    assert value == pytest.approx(0.110944, abs=1e-6)
