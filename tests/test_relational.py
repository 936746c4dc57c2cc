"""CRCKD (CCD, CRP, mean teacher) and the CRD / SP / FitNet baselines against numpy references."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from melanoma_tf.distill import relational_losses as R
from melanoma_tf.backend import keras, tf
from melanoma_tf.config import RelationalConfig


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------- sampling and memory banks


def test_class_guided_indices_come_from_the_right_classes():
    # Seeded: 40 uniform draws miss one of 7 negatives with probability ~1.5%, which made this test flaky.
    tf.random.set_seed(3)
    labels = np.array([0, 1, 2, 0, 1, 2, 2, 0, 1, 2, 0, 0])
    sampler = R.ClassSampler(labels)
    index = np.array([0, 4, 6, 11])
    idx = sampler.class_guided(tf.constant(index), k_pos=5, k_neg=40).numpy()
    assert idx.shape == (4, 45)
    np.testing.assert_array_equal(idx[:, 0], index)  # the sample itself is the first positive
    for row, i in zip(idx, index):
        assert (labels[row[1:5]] == labels[i]).all()  # positives: same class
        assert (labels[row[5:]] != labels[i]).all()  # negatives: other classes only
        assert row.min() >= 0 and row.max() < len(labels)
    # With 40 draws the negatives cover every image of the other classes (not only the first ones).
    others = set(np.flatnonzero(labels != labels[6]))
    assert set(idx[2, 5:]) == others


def test_uniform_indices_exclude_the_anchor():
    sampler = R.ClassSampler(np.array([0, 1, 0, 1, 1]))
    idx = sampler.uniform(tf.constant([3, 0]), k_neg=200).numpy()
    np.testing.assert_array_equal(idx[:, 0], [3, 0])
    assert 3 not in idx[0, 1:] and 0 not in idx[1, 1:]
    assert set(idx[0, 1:]) == {0, 1, 2, 4}  # uniform over every other image, any class


def test_memory_bank_updates_only_the_batch_rows():
    rng = np.random.default_rng(0)
    start = _unit(rng.normal(size=(6, 3))).astype(np.float32)
    bank = tf.Variable(start)
    values = _unit(rng.normal(size=(2, 3))).astype(np.float32)
    R.update_bank(bank, tf.constant([4, 1]), tf.constant(values), momentum=0.5)
    out = bank.numpy()
    untouched = [0, 2, 3, 5]
    np.testing.assert_array_equal(out[untouched], start[untouched])
    expected = _unit(0.5 * start[[4, 1]] + 0.5 * values)
    np.testing.assert_allclose(out[[4, 1]], expected, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)


def test_init_bank_has_unit_expected_norm():
    bank = R.init_bank(2000, 128, seed=0)
    assert abs(np.mean(np.sum(bank ** 2, axis=1)) - 1.0) < 0.02


# --------------------------------------------------------------------------- CCD / CRD


def _nce_numpy(scores, k_pos, n_data):
    noise = (scores.shape[1] - k_pos) / n_data
    pos, neg = scores[:, :k_pos], scores[:, k_pos:]
    per_sample = np.mean(np.log(pos / (pos + noise + R.EPS)), axis=1) + np.sum(
        np.log(noise / (neg + noise + R.EPS)), axis=1)
    return -per_sample.mean()


def test_nce_loss_matches_the_formula_by_hand():
    scores = np.array([[2.0, 1.0, 0.5, 0.1], [0.3, 0.2, 1.5, 0.01]], np.float32)
    # By hand for row 0, k_pos 2, M = 10: noise = 2/10.
    noise = 0.2
    row0 = -((math.log(2 / 2.2) + math.log(1 / 1.2)) / 2 + math.log(noise / 0.7) + math.log(noise / 0.3))
    row1 = -((math.log(0.3 / 0.5) + math.log(0.2 / 0.4)) / 2 + math.log(noise / 1.7) + math.log(noise / 0.21))
    got = float(R.nce_loss(tf.constant(scores), 2, 10))
    assert got == pytest.approx((row0 + row1) / 2, rel=1e-5)
    assert got == pytest.approx(_nce_numpy(scores.astype(np.float64), 2, 10), rel=1e-5)


def test_contrastive_loss_uses_the_other_models_bank():
    rng = np.random.default_rng(1)
    n, d, b, k_pos, tau = 10, 4, 3, 2, 0.5
    bank_s, bank_t = (_unit(rng.normal(size=(n, d))).astype(np.float32) for _ in range(2))
    f_s, f_t = (_unit(rng.normal(size=(b, d))).astype(np.float32) for _ in range(2))
    idx = rng.integers(0, n, size=(b, 6))
    z_s, z_t = 3.0, 5.0
    got = float(R.contrastive_loss(tf.constant(f_s), tf.constant(f_t), tf.constant(bank_s), tf.constant(bank_t),
                                   tf.constant(idx), k_pos, tau, n, tf.constant(z_s), tf.constant(z_t)))
    # Student anchors are scored against the teacher's bank, and the reverse.
    s_scores = np.exp(np.einsum("bkd,bd->bk", bank_t[idx], f_s) / tau) / z_s
    t_scores = np.exp(np.einsum("bkd,bd->bk", bank_s[idx], f_t) / tau) / z_t
    expected = _nce_numpy(s_scores, k_pos, n) + _nce_numpy(t_scores, k_pos, n)
    assert got == pytest.approx(expected, rel=1e-5)
    swapped = float(R.contrastive_loss(tf.constant(f_s), tf.constant(f_t), tf.constant(bank_t), tf.constant(bank_s),
                                       tf.constant(idx), k_pos, tau, n, tf.constant(z_s), tf.constant(z_t)))
    assert swapped != pytest.approx(got, rel=1e-3)


def test_contrastive_loss_is_lower_when_positives_agree():
    """Anchors equal to their positives' bank rows score better than anchors pointing elsewhere."""
    rng = np.random.default_rng(2)
    n, d = 8, 4
    bank = _unit(rng.normal(size=(n, d))).astype(np.float32)
    idx = np.array([[0, 1, 2, 3, 4, 5]])
    aligned = bank[[0]]
    opposed = -bank[[0]]
    loss = [float(R.contrastive_loss(tf.constant(f), tf.constant(f), tf.constant(bank), tf.constant(bank),
                                     tf.constant(idx), 1, 0.1, n, tf.constant(1.0), tf.constant(1.0)))
            for f in (aligned, opposed)]
    assert loss[0] < loss[1]


# --------------------------------------------------------------------------- CRP


def _crp_numpy(f_s, f_t, bank_s, bank_t, labels, k, tau):
    def centroids(bank):
        c = np.stack([np.maximum(bank[labels == j], 0).mean(axis=0) for j in range(k)])
        return _unit(c)

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p_t = softmax(f_t @ centroids(bank_t).T / tau)
    p_s = softmax(f_s @ centroids(bank_s).T / tau)
    return np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1))


def test_crp_matches_numpy_and_is_zero_when_relations_match():
    rng = np.random.default_rng(3)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 2])
    bank_s, bank_t = (_unit(rng.normal(size=(8, 5))).astype(np.float32) for _ in range(2))
    f_s, f_t = (_unit(rng.normal(size=(4, 5))).astype(np.float32) for _ in range(2))
    args = (tf.constant(labels, tf.int32), 3, 0.07)
    got = float(R.crp_loss(tf.constant(f_s), tf.constant(f_t), tf.constant(bank_s), tf.constant(bank_t), *args))
    assert got == pytest.approx(_crp_numpy(f_s, f_t, bank_s, bank_t, labels, 3, 0.07), rel=1e-4)
    assert got > 0
    same = float(R.crp_loss(tf.constant(f_s), tf.constant(f_s), tf.constant(bank_s), tf.constant(bank_s), *args))
    assert same == pytest.approx(0.0, abs=1e-6)


def test_class_centroids_average_relu_rows_of_each_class():
    bank = np.array([[1.0, -1.0], [3.0, 1.0], [0.0, 2.0]], np.float32)
    got = R.class_centroids(tf.constant(bank), tf.constant([0, 0, 1]), 2).numpy()
    np.testing.assert_allclose(got, _unit(np.array([[2.0, 0.5], [0.0, 2.0]])), rtol=1e-6)


# --------------------------------------------------------------------------- SP and FitNet


def test_sp_loss_matches_numpy_and_vanishes_for_equal_relations():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)
    b = rng.normal(size=(4, 2, 2, 5)).astype(np.float32)  # other shape: only the batch size must agree

    def gram(x):
        flat = x.reshape(len(x), -1)
        return _unit(flat @ flat.T)

    expected = np.sum((gram(a) - gram(b)) ** 2) / 16
    assert float(R.sp_loss(tf.constant(a), tf.constant(b))) == pytest.approx(expected, rel=1e-5)
    assert float(R.sp_loss(tf.constant(a), tf.constant(2 * a))) == pytest.approx(0.0, abs=1e-6)
    assert R.similarity_matrix(tf.constant(a)).shape == (4, 4)


def test_fitnet_regresses_the_student_hint_onto_the_teacher_grid():
    rng = np.random.default_rng(5)
    hint_s = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    hint_t = rng.normal(size=(2, 4, 4, 5)).astype(np.float32)
    regressor = keras.layers.Conv2D(5, 1, use_bias=False)
    regressor.build((None, None, None, 3))
    kernel = rng.normal(size=(1, 1, 3, 5)).astype(np.float32)
    regressor.set_weights([kernel])
    expected = np.mean((np.einsum("bhwc,cd->bhwd", hint_s, kernel[0, 0]) - hint_t) ** 2)
    assert float(R.fitnet_loss(tf.constant(hint_s), tf.constant(hint_t), regressor)) == pytest.approx(expected,
                                                                                                     rel=1e-5)
    small = tf.constant(hint_s[:, :2, :2])  # a coarser student grid is resized to the teacher's
    assert np.isfinite(float(R.fitnet_loss(small, tf.constant(hint_t), regressor)))


# --------------------------------------------------------------------------- schedule, EMA, relations


def test_rampup_schedule():
    assert R.rampup(0, 30) == pytest.approx(math.exp(-5))
    assert R.rampup(15, 30) == pytest.approx(math.exp(-1.25))
    assert R.rampup(30, 30) == 1.0 and R.rampup(80, 30) == 1.0
    assert R.rampup(3, 0) == 1.0
    values = [R.rampup(t, 10) for t in range(11)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_ema_decay_uses_the_true_average_first():
    assert R.ema_decay(0, 0.99) == 0.0
    assert R.ema_decay(1, 0.99) == 0.5
    assert R.ema_decay(9, 0.99) == pytest.approx(0.9)
    assert R.ema_decay(10_000, 0.99) == 0.99


def test_relation_ratio_by_hand():
    features = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = np.array([0, 0, 1, 1])
    stats = R.relation_ratio(features, labels)
    assert stats["intra"] == pytest.approx((1.0 + 0.8) / 2)  # pairs (0,1) and (2,3)
    assert stats["inter"] == pytest.approx((0.0 + 0.6 + 0.0 + 0.6) / 4)
    assert stats["rd"] == pytest.approx(0.9 / 0.3)


# --------------------------------------------------------------------------- the distiller


def _tiny_model(name: str, size: int = 8, outputs: int = 3, channels: int = 4) -> keras.Model:
    image = keras.Input((size, size, 3), name="image")
    x = keras.layers.Conv2D(channels, 3, padding="same", name="conv")(image)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(0.0, name="head_dropout")(pooled)
    return keras.Model(image, keras.layers.Dense(outputs, name="logits")(x), name=name)


def _batch(n=6, size=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, size=(n, size, size, 3)).astype(np.float32)
    return images


def _distiller(cfg: RelationalConfig, labels, teacher=None, seed=0):
    from melanoma_tf.losses import softmax_ce
    from melanoma_tf.distill.relational import RelationalDistiller

    tf.random.set_seed(seed)
    student = _tiny_model("student")
    trainer = RelationalDistiller(student, softmax_ce, labels, cfg, 8, teacher=teacher, labels="multiclass",
                                  seed=seed)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1))
    trainer.set_epoch(5)
    return trainer


FULL = RelationalConfig(teacher_mode="mean_teacher", ema_decay=0.99, kl_weight=1.0, ccd_weight=0.1,
                        ccd_weight_after=0.01, crp_weight=1.0, crd_weight=0.1, sp_weight=1.0, fitnet_weight=1.0,
                        rampup_epochs=2, feat_dim=4, k_pos=2, k_neg=5)


def test_train_step_updates_banks_ema_and_normalisers():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    trainer = _distiller(FULL, labels)
    bank_before = trainer.bank_s.numpy().copy()
    ema_before = {v.name: v.numpy().copy() for v in trainer.ema.weights}
    student_before = {v.name: v.numpy().copy() for v in trainer.student.weights}
    images = _batch(3)
    index = np.array([2, 5, 7])
    inputs = {"image": tf.constant(images), "image_teacher": tf.constant(images[::-1].copy()),
              "index": tf.constant(index, tf.int64)}
    logs = trainer.train_step((inputs, tf.constant(labels[index], tf.int32), tf.ones(3)))
    assert all(np.isfinite(float(v)) for v in logs.values())
    assert set(logs) >= {"loss", "student_loss", "kl_loss", "ccd_loss", "crp_loss", "crd_loss", "sp_loss",
                         "fitnet_loss"}
    bank_after = trainer.bank_s.numpy()
    others = np.setdiff1d(np.arange(len(labels)), index)
    np.testing.assert_array_equal(bank_after[others], bank_before[others])
    assert not np.allclose(bank_after[index], bank_before[index])
    assert (trainer.z.numpy() > 0).all()  # both CCD and CRD normalisers fixed on the first batch
    # Step 1: decay min(1 - 1/2, 0.99) = 0.5: the mean teacher is halfway between old and new weights.
    from melanoma_tf.distill.relational import ema_pairs

    for ema_w, w in ema_pairs(trainer.ema, trainer.student):
        old_ema = ema_before[ema_w.name]
        np.testing.assert_allclose(ema_w.numpy(), 0.5 * old_ema + 0.5 * w.numpy(), rtol=1e-5, atol=1e-6)
    changed = [n for n, v in student_before.items()
               if not np.allclose(v, next(w for w in trainer.student.weights if w.name == n).numpy())]
    assert changed, "the student did not learn"


def test_schedule_sets_the_paper_weights():
    trainer = _distiller(replace(FULL, rampup_epochs=4, kl_weight=2.0, crp_weight=3.0), np.array([0, 1, 2, 0]))
    w = trainer.set_epoch(0)
    assert w["lambda_kl"] == pytest.approx(2.0 * math.exp(-5)) and w["lambda_crp"] == pytest.approx(3.0 * math.exp(-5))
    assert w["lambda_ccd"] == 0.1
    w = trainer.set_epoch(4)
    assert w == {"lambda_kl": 2.0, "lambda_crp": 3.0, "lambda_ccd": 0.01}
    assert float(trainer.lambda_ccd) == pytest.approx(0.01)


def test_fixed_teacher_with_another_architecture_and_size():
    teacher = _tiny_model("teacher", size=12, channels=6)
    cfg = replace(FULL, teacher_mode="fixed")
    trainer = _distiller(cfg, np.array([0, 1, 2, 0, 1, 2]), teacher=teacher)
    assert trainer.ema is None
    teacher_before = [v.numpy().copy() for v in teacher.weights]
    images = _batch(2)
    inputs = {"image": tf.constant(images), "index": tf.constant([0, 1], tf.int64)}
    logs = trainer.train_step((inputs, tf.constant([0, 1], tf.int32), tf.ones(2)))
    assert np.isfinite(float(logs["fitnet_loss"]))
    assert trainer.regressor.kernel.shape == (1, 1, 4, 6)  # student channels -> teacher channels
    for before, v in zip(teacher_before, teacher.weights):
        np.testing.assert_array_equal(before, v.numpy())  # a fixed teacher never changes


def test_state_round_trips_through_a_checkpoint(tmp_path):
    labels = np.array([0, 1, 2, 0, 1, 2])
    trainer = _distiller(FULL, labels, seed=0)
    images = _batch(2)
    inputs = {"image": tf.constant(images), "index": tf.constant([1, 4], tf.int64)}
    trainer.train_step((inputs, tf.constant([1, 1], tf.int32), tf.ones(2)))
    path = trainer.state().save(str(tmp_path / "state"))
    fresh = _distiller(FULL, labels, seed=9)
    assert not np.allclose(fresh.bank_s.numpy(), trainer.bank_s.numpy())
    fresh.state().restore(path).assert_existing_objects_matched()
    np.testing.assert_array_equal(fresh.bank_s.numpy(), trainer.bank_s.numpy())
    np.testing.assert_array_equal(fresh.z.numpy(), trainer.z.numpy())
    np.testing.assert_array_equal(fresh.proj_t.kernel.numpy(), trainer.proj_t.kernel.numpy())
    np.testing.assert_array_equal(fresh.ema.get_layer("conv").kernel.numpy(),
                                  trainer.ema.get_layer("conv").kernel.numpy())


def test_feature_model_needs_a_melanoma_tf_head():
    from melanoma_tf.distill.relational import feature_model

    image = keras.Input((8, 8, 3))
    plain = keras.Model(image, keras.layers.Dense(1)(keras.layers.Flatten()(image)))
    with pytest.raises(ValueError, match="head_dropout"):
        feature_model(plain, 8)


def test_crd_is_one_positive_and_uniform_negatives():
    """CRD's loss: the anchor's own row is the only positive; negatives may be of its class too."""
    rng = np.random.default_rng(6)
    labels = np.array([0, 0, 0, 1, 1, 1])
    n, d, tau = len(labels), 3, 0.2
    bank_s, bank_t = (_unit(rng.normal(size=(n, d))).astype(np.float32) for _ in range(2))
    f_s, f_t = (_unit(rng.normal(size=(2, d))).astype(np.float32) for _ in range(2))
    tf.random.set_seed(0)
    idx = R.ClassSampler(labels).uniform(tf.constant([0, 4]), k_neg=50).numpy()
    assert (labels[idx[0, 1:]] == 0).any() and (labels[idx[0, 1:]] == 1).any()
    got = float(R.contrastive_loss(tf.constant(f_s), tf.constant(f_t), tf.constant(bank_s), tf.constant(bank_t),
                                   tf.constant(idx), 1, tau, n, tf.constant(2.0), tf.constant(2.0)))
    s_scores = np.exp(np.einsum("bkd,bd->bk", bank_t[idx], f_s) / tau) / 2.0
    t_scores = np.exp(np.einsum("bkd,bd->bk", bank_s[idx], f_t) / tau) / 2.0
    assert got == pytest.approx(_nce_numpy(s_scores, 1, n) + _nce_numpy(t_scores, 1, n), rel=1e-5)
