"""Metrics against hand-computed cases, cross-checked with scikit-learn where it has the metric."""

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from melanoma_tf import metrics as M
from melanoma_tf.metrics import MetricError

Y = np.array([1, 1, 1, 1, 0, 0])
S = np.array([0.9, 0.8, 0.3, 0.2, 0.5, 0.1])


def test_roc_auc_with_ties_hand_value():
    # pairs (pos, neg): (.5,.5) tie -> 1/2, (.5,.2) 1, (.8,.5) 1, (.8,.2) 1 -> 3.5 / 4
    assert M.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.8]) == pytest.approx(0.875)
    # 8 pairs: positives .9 and .8 beat both negatives (4); .3 beats .1 (1); .2 beats .1 (1)
    assert M.roc_auc(Y, S) == pytest.approx(6 / 8)


def test_pr_auc_hand_value_and_sklearn():
    # at .9: P=1, R=.5; at .8: P=.5, R=.5; at .7: P=2/3, R=1 -> AP = .5*1 + .5*2/3
    assert M.pr_auc([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 200), rng.random(200)
    assert M.pr_auc(y, s) == pytest.approx(skm.average_precision_score(y, s))
    assert M.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s))


def test_roc_auc_equals_sklearn_with_ties_and_imbalance():
    rng = np.random.default_rng(1)
    for n, share, levels in ((50, 0.5, 5), (400, 0.1, 20), (3000, 0.03, 1000)):
        y = (rng.random(n) < share).astype(int)
        y[:2] = [0, 1]
        s = np.round(rng.random(n) + 0.3 * y, 3) * levels // 1  # few distinct values: many ties
        assert M.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
        assert M.roc_auc(y, -s) == pytest.approx(1 - M.roc_auc(y, s), abs=1e-12)


def test_one_class_is_a_clear_error():
    with pytest.raises(MetricError, match="need both classes"):
        M.roc_auc([1, 1, 1], [0.2, 0.3, 0.4])
    with pytest.raises(MetricError, match="need both classes"):
        M.threshold_for_sensitivity([0, 0], [0.1, 0.2])
    with pytest.raises(MetricError, match="0 or 1"):
        M.roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(MetricError, match="length"):
        M.pr_auc([0, 1], [0.1])


def test_threshold_for_sensitivity_hand_values():
    # positives sorted .9 .8 .3 .2: 75% needs 3 of 4 -> .3; 95% needs 4 -> .2
    assert M.threshold_for_sensitivity(Y, S, 0.75) == 0.3
    assert M.threshold_for_sensitivity(Y, S, 0.95) == 0.2
    assert M.threshold_for_sensitivity(Y, S, 1.0) == 0.2
    assert M.threshold_for_sensitivity(Y, S, 0.25) == 0.9
    # ties: every tied positive is called, so sensitivity may exceed the target
    t = M.threshold_for_sensitivity([1, 1, 1, 1, 0], [0.5, 0.5, 0.5, 0.1, 0.7], 0.5)
    assert t == 0.5 and M.rates_at([1, 1, 1, 1, 0], [0.5, 0.5, 0.5, 0.1, 0.7], t)["sensitivity"] == 0.75
    with pytest.raises(MetricError):
        M.threshold_for_sensitivity(Y, S, 0.0)


def test_rates_at_hand_values():
    r = M.rates_at(Y, S, 0.3)  # called: .9 .8 .3 .5 -> tp 3, fp 1, fn 1, tn 1
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (3, 1, 1, 1)
    assert r["sensitivity"] == 0.75 and r["specificity"] == 0.5
    assert r["ppv"] == 0.75 and r["npv"] == 0.5 and r["f1"] == pytest.approx(0.75)
    none_called = M.rates_at(Y, S, 0.95)
    assert np.isnan(none_called["ppv"]) and none_called["sensitivity"] == 0.0 and none_called["specificity"] == 1.0
    assert r["f1"] == pytest.approx(skm.f1_score(Y, S >= 0.3))


def test_ece_brier_and_reliability_known_case():
    y, p = np.array([0, 1, 1, 1]), np.array([0.1, 0.1, 0.9, 0.9])
    # bins {.1,.1}: rate .5 vs .1 -> .4 * 1/2; {.9,.9}: rate 1 vs .9 -> .1 * 1/2
    assert M.ece(y, p, n_bins=2) == pytest.approx(0.25)
    assert M.brier(y, p) == pytest.approx((0.01 + 0.81 + 0.01 + 0.01) / 4)
    bins = M.reliability_bins(y, p, 2)
    assert [b["count"] for b in bins] == [2, 2] and bins[0]["observed"] == 0.5
    assert M.ece([0, 1], [0.0, 1.0]) == 0.0
    # equal-mass: 10 bins of 10 images each for 100 scores
    assert {b["count"] for b in M.reliability_bins(np.zeros(100), np.linspace(0, 1, 100))} == {10}


def test_temperature_scaling_recovers_known_temperature():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 4, 20000)
    y = (rng.random(20000) < M.sigmoid(z / 2.0)).astype(int)
    assert M.fit_temperature(z, y) == pytest.approx(2.0, rel=0.06)
    calibrated = M.sigmoid(z / M.fit_temperature(z, y))
    assert M.ece(y, calibrated) < M.ece(y, M.sigmoid(z))
    zm = rng.normal(0, 3, (5000, 3))
    ym = np.array([rng.choice(3, p=row) for row in M.softmax(zm / 0.5)])
    assert M.fit_temperature(zm, ym, "multiclass") == pytest.approx(0.5, rel=0.1)


def test_platt_recovers_slope_and_intercept():
    rng = np.random.default_rng(4)
    z = rng.normal(0, 3, 20000)
    y = (rng.random(20000) < M.sigmoid(0.5 * z - 2.0)).astype(int)
    a, b = M.fit_platt(z, y)
    assert a == pytest.approx(0.5, abs=0.05) and b == pytest.approx(-2.0, abs=0.1)


def test_bootstrap_reproducible_and_resamples_whole_lesions():
    rng = np.random.default_rng(0)
    y = np.repeat(rng.integers(0, 2, 60), 2)  # every lesion has two images
    s = np.repeat(rng.random(60), 2) + 0.3 * y
    groups = np.repeat(np.arange(60), 2)
    a = M.bootstrap_ci(y, s, groups, M.roc_auc, n_boot=200, seed=5)
    b = M.bootstrap_ci(y, s, groups, M.roc_auc, n_boot=200, seed=5)
    c = M.bootstrap_ci(y, s, groups, M.roc_auc, n_boot=200, seed=6)
    assert a == b and a != c
    assert a[0] <= M.roc_auc(y, s) <= a[1]

    # Lesions of 1, 2 and 3 images, each image of a lesion with that lesion's own score: in a resample every
    # score must appear a multiple of its lesion's size (a per-image bootstrap breaks that at once).
    sizes = np.resize([1, 2, 3], 60)
    lesion = np.repeat(np.arange(60), sizes)
    unique_score = rng.permutation(60) / 60 + 0.001
    yl = np.repeat(rng.integers(0, 2, 60), sizes)
    sl = unique_score[lesion]
    seen = []

    def whole_lesions_only(yy, ss):
        values, counts = np.unique(ss, return_counts=True)
        index = np.searchsorted(np.sort(unique_score), values)
        size_of = sizes[np.argsort(unique_score)][index]
        assert np.all(counts % size_of == 0), "a lesion was split"
        seen.append(len(yy))
        return M.roc_auc(yy, ss)

    M.bootstrap_ci(yl, sl, lesion, whole_lesions_only, n_boot=50, seed=1)
    assert len(seen) == 50 and len(set(seen)) > 1  # resample sizes vary: lesions of different sizes were drawn


def test_bootstrap_blank_lesion_ids_are_single_images_not_one_lesion():
    """Blank ids (NaN, None, '') never pool into one giant lesion; real ids still group."""
    groups = np.array(["L1", "L1", np.nan, None, "", "  ", "L2"], dtype=object)
    index, summary = M.bootstrap_groups(groups)
    assert index[0] == index[1] and len(set(index[2:6])) == 4 and index[6] not in index[:6]
    assert summary == {"unit": "lesions and images", "n_groups": 6, "n_without_lesion_id": 4}
    assert M.bootstrap_groups(np.full(5, np.nan))[1] == {"unit": "images", "n_groups": 5, "n_without_lesion_id": 5}
    rng = np.random.default_rng(2)
    y = np.tile([0, 1], 50)
    s = rng.random(100) + 0.5 * y
    low, high = M.bootstrap_ci(y, s, np.full(100, np.nan), M.roc_auc, n_boot=200, seed=0)
    assert high - low > 0.05  # pooled into one lesion, every resample was the whole set: low == high


def test_refer_band():
    z = np.array([-3.0, -0.5, 0.2, 0.4, 3.0])
    margin = M.refer_margin(z, 0.0, 0.4)  # 40% of images within the band
    assert margin == pytest.approx(np.quantile(np.abs(z), 0.4))
    summary = M.refer_summary([0, 1, 0, 1, 1], z, 0.0, 0.45)
    assert summary["refer_fraction"] == pytest.approx(2 / 5)  # 0.2 and 0.4 referred
    assert summary["referred_melanomas"] == 1
    # decided: -3 (y0, tn), -0.5 (y1, fn), 3 (y1, tp)
    assert summary["decided_sensitivity"] == 0.5 and summary["decided_specificity"] == 1.0


def test_multiclass_report():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .8, .1], [.1, .7, .2], [.1, .1, .8], [.5, .2, .3]])
    r = M.multiclass_report(y, p, ["a", "b", "c"])
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert r["bma"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert r["macro_f1"] == pytest.approx(skm.f1_score(y, p.argmax(1), average="macro"))
    assert r["per_class_auc"]["c"] == pytest.approx(skm.roc_auc_score(y == 2, p[:, 2]))


def test_subgroup_audit_flags_sensitivity_drop():
    frame = pd.DataFrame({"label": [1, 1, 0, 0, 1, 1, 0, 0], "prob": [.9, .8, .1, .6, .9, .2, .1, .2],
                          "sex": ["f"] * 4 + ["m"] * 4, "age_band": ["<30"] * 8})
    rows = {(r["attribute"], r["group"]): r for r in M.subgroup_audit(frame, 0.5)}
    assert rows[("sex", "f")]["sensitivity"] == 1.0 and not rows[("sex", "f")]["flag"]
    assert rows[("sex", "m")]["sensitivity"] == 0.5 and rows[("sex", "m")]["flag"]
    assert rows[("sex", "m")]["n"] == 4 and rows[("sex", "m")]["n_melanoma"] == 2
    assert M.age_band(29) == "<30" and M.age_band(75) == "75+" and M.age_band(float("nan")) == "unknown"
