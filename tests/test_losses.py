"""Losses against values computed by hand (math module formulas and literal numbers)."""

import math

import numpy as np
import pytest

from melanoma_tf import losses as L


def sig(z):
    return 1 / (1 + math.exp(-z))


Y = np.array([[1.0], [0.0], [1.0]])
Z = np.array([[0.0], [2.0], [-1.0]])


def test_bce_literal_values():
    # y=1,z=0: ln 2 = 0.693147; y=0,z=2: ln(1+e^2) = 2.126928
    assert float(L.bce([[1.0], [0.0]], [[0.0], [2.0]])) == pytest.approx((0.693147 + 2.126928) / 2, abs=1e-6)


def test_bce_matches_formula_and_sample_weight():
    per = [-(y * math.log(sig(z)) + (1 - y) * math.log(1 - sig(z))) for y, z in zip(Y.ravel(), Z.ravel())]
    assert float(L.bce(Y, Z)) == pytest.approx(np.mean(per), rel=1e-6)
    w = np.array([2.0, 0.5, 1.0])
    assert float(L.bce(Y, Z, sample_weight=w)) == pytest.approx(np.mean(np.array(per) * w), rel=1e-6)


@pytest.mark.parametrize("w", [0.6, 0.7, 0.8])
def test_weighted_bce(w):
    per = [-(w * y * math.log(sig(z)) + (1 - w) * (1 - y) * math.log(1 - sig(z))) for y, z in zip(Y.ravel(), Z.ravel())]
    assert float(L.weighted_bce(Y, Z, pos_weight=w)) == pytest.approx(np.mean(per), rel=1e-6)
    # literal: w=0.7, (y=1,z=0) -> 0.7 ln2 = 0.485203
    assert float(L.weighted_bce([[1.0]], [[0.0]], 0.7)) == pytest.approx(0.485203, abs=1e-6)


def test_weighted_bce_is_stable_for_large_logits():
    value = float(L.weighted_bce([[1.0], [0.0]], [[-200.0], [300.0]], 0.5))
    assert value == pytest.approx((0.5 * 200 + 0.5 * 300) / 2, rel=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 2.0, 4.0])
def test_focal_matches_formula(gamma):
    per = []
    for y, z in zip(Y.ravel(), Z.ravel()):
        p_t = sig(z) if y == 1 else 1 - sig(z)
        per.append(-((1 - p_t) ** gamma) * math.log(p_t))
    assert float(L.focal(Y, Z, gamma=gamma)) == pytest.approx(np.mean(per), rel=1e-5)
    alpha = 0.25
    weighted = [(alpha if y == 1 else 1 - alpha) * v for y, v in zip(Y.ravel(), per)]
    assert float(L.focal(Y, Z, gamma=gamma, alpha=alpha)) == pytest.approx(np.mean(weighted), rel=1e-5)


def test_focal_gamma_zero_is_bce():
    assert float(L.focal(Y, Z, gamma=0.0)) == pytest.approx(float(L.bce(Y, Z)), rel=1e-6)
    # literal: y=1, z=0, gamma=2 -> 0.25 ln 2 = 0.173287
    assert float(L.focal([[1.0]], [[0.0]], gamma=2.0)) == pytest.approx(0.173287, abs=1e-6)


def test_multiclass_losses():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    y = np.array([0, 2])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    nll = -np.log(p[np.arange(2), y])
    assert float(L.softmax_ce(y, logits)) == pytest.approx(nll.mean(), rel=1e-6)
    cw = np.array([0.5, 1.0, 3.0])
    assert float(L.weighted_ce(y, logits, cw)) == pytest.approx((nll * cw[y]).mean(), rel=1e-6)
    p_y = p[np.arange(2), y]
    assert float(L.focal_multiclass(y, logits, gamma=2.0)) == pytest.approx(
        (-(1 - p_y) ** 2 * np.log(p_y)).mean(), rel=1e-5)
    # literal: uniform over 3 classes -> ln 3 = 1.098612
    assert float(L.softmax_ce([2], [[0.0, 0.0, 0.0]])) == pytest.approx(1.098612, abs=1e-6)


def test_kd_binary_hand_values():
    # z_t=2, z_s=0, T=2: target sigmoid(1), student 0.5 -> ln 2 = 0.693147
    # z_t=0, z_s=4, T=2: target 0.5, student sigmoid(2) -> -(0.5 ln .880797 + 0.5 ln .119203) = 1.126928
    value = float(L.kd_binary([[2.0], [0.0]], [[0.0], [4.0]], temperature=2.0))
    assert value == pytest.approx((0.693147 + 1.126928) / 2, abs=1e-6)


def test_kd_binary_is_not_the_softmax_trap():
    # softmax over one logit is 1 whatever the logit, so softmax KD would vanish here
    assert float(L.kd_softmax([[3.0]], [[-3.0]], 1.0)) == pytest.approx(0.0, abs=1e-7)
    assert float(L.kd_binary([[3.0]], [[-3.0]], 1.0)) > 2.0
    # gradient only vanishes when student matches teacher: BCE minimum is the teacher's entropy
    t = 1.5
    q = sig(t)
    entropy = -(q * math.log(q) + (1 - q) * math.log(1 - q))
    assert float(L.kd_binary([[t]], [[t]], 1.0)) == pytest.approx(entropy, rel=1e-6)


def test_kd_softmax_hand_value():
    # p_t = [0.731059, 0.268941], p_s = [0.5, 0.5]: KL = 0.110944
    assert float(L.kd_softmax([[1.0, 0.0]], [[0.0, 0.0]], 1.0)) == pytest.approx(0.110944, abs=1e-6)
    assert float(L.kd_softmax([[1.0, 0.0, 2.0]], [[1.0, 0.0, 2.0]], 3.0)) == pytest.approx(0.0, abs=1e-7)


def test_registry_and_factory():
    assert set(L.LOSSES["binary"]) == set(L.LOSSES["multiclass"]) == {"bce", "wbce", "focal"}
    fn = L.student_loss("wbce", "binary", pos_weight=0.8)
    assert float(fn(Y, Z)) == pytest.approx(float(L.weighted_bce(Y, Z, 0.8)), rel=1e-7)
    fn = L.student_loss("focal", "binary", gamma=4.0)
    assert float(fn(Y, Z)) == pytest.approx(float(L.focal(Y, Z, 4.0)), rel=1e-7)
    with pytest.raises(ValueError, match="loss.name"):
        L.student_loss("hinge", "binary")
    with pytest.raises(ValueError, match="class weights"):
        L.student_loss("wbce", "multiclass")
