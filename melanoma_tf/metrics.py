"""Classification metrics as pure functions of labels and scores (NumPy in, floats out)."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn import metrics as skm

from melanoma_tf.errors import MelanomaTfError


class MetricError(MelanomaTfError, ValueError):
    """The inputs cannot give the metric (e.g. only one class present)."""


def _binary(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise MetricError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if not np.isin(y, (0, 1)).all():
        raise MetricError("binary labels must be 0 or 1")
    if len(np.unique(y)) < 2:
        raise MetricError(f"need both classes, got only label {int(y[0]) if len(y) else 'none'} "
                          f"in {len(y)} images")
    return y.astype(np.int64), s


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve (ties count one half).

    The Mann-Whitney form: the mean rank of the melanomas among all scores, tied
    scores sharing their average rank. Equal to ``sklearn.metrics.roc_auc_score``
    and fast enough to be called for every bootstrap resample.
    """
    y, s = _binary(y_true, scores)
    positives = int(y.sum())
    negatives = len(y) - positives
    rank_sum = float(rankdata(s)[y == 1].sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def pr_auc(y_true, scores) -> float:
    """Average precision (step-wise area under the precision-recall curve)."""
    y, s = _binary(y_true, scores)
    return float(skm.average_precision_score(y, s))


def multiclass_auc(y_true, probs) -> float:
    """Macro one-vs-rest ROC-AUC over the classes present in y_true."""
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    present = np.unique(y)
    if len(present) < 2:
        raise MetricError("need at least two classes for a multiclass AUC")
    return float(np.mean([skm.roc_auc_score(y == k, p[:, k]) for k in present]))


def multiclass_ap(y_true, probs) -> float:
    """Macro one-vs-rest average precision over the classes present in y_true."""
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    return float(np.mean([skm.average_precision_score(y == k, p[:, k]) for k in np.unique(y)]))


def balanced_accuracy(y_true, probs) -> float:
    """Balanced multiclass accuracy (mean per-class recall) of the arg-max prediction."""
    y = np.asarray(y_true).reshape(-1)
    return float(skm.balanced_accuracy_score(y, np.argmax(probs, axis=-1)))


def sigmoid(logits) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def softmax(logits) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def validation_summary(y_true, logits, labels: str) -> dict:
    """Per-epoch (and cross-validation) scores from logits.

    Binary: ROC-AUC, PR-AUC, and the specificity at the threshold that gives
    95% sensitivity on these same images (the operating point on this curve).
    Multiclass: macro one-vs-rest ROC-AUC and AP (``pr_auc``), BMA, accuracy
    and macro F1.
    """
    if labels == "binary":
        y = np.asarray(y_true).reshape(-1)
        p = sigmoid(np.reshape(logits, -1))
        out = {"roc_auc": roc_auc(y, p), "pr_auc": pr_auc(y, p)}
        if 0 < y.sum() < len(y):
            out["spec_at_sens95"] = rates_at(y, p, threshold_for_sensitivity(y, p, 0.95))["specificity"]
        return out
    y = np.asarray(y_true).reshape(-1)
    p = softmax(logits)
    predicted = np.argmax(p, axis=-1)
    return {"roc_auc": multiclass_auc(y, p), "pr_auc": multiclass_ap(y, p), "bma": balanced_accuracy(y, p),
            "acc": float(np.mean(predicted == y)),
            "f1": float(skm.f1_score(y, predicted, average="macro", labels=np.unique(y)))}


# --------------------------------------------------------------------------- operating point


def confusion_at(y_true, scores, threshold: float) -> dict:
    """Counts at a threshold; an image is called melanoma when its score >= threshold."""
    y = np.asarray(y_true).reshape(-1).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    called = s >= threshold
    return {"tp": int(np.sum(called & (y == 1))), "fp": int(np.sum(called & (y == 0))),
            "tn": int(np.sum(~called & (y == 0))), "fn": int(np.sum(~called & (y == 1)))}


def _ratio(num: int, den: int) -> float:
    return float(num / den) if den else float("nan")


def rates_at(y_true, scores, threshold: float) -> dict:
    """Sensitivity, specificity, PPV, NPV and F1 at a fixed threshold (NaN where undefined)."""
    c = confusion_at(y_true, scores, threshold)
    sens = _ratio(c["tp"], c["tp"] + c["fn"])
    ppv = _ratio(c["tp"], c["tp"] + c["fp"])
    f1 = _ratio(2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"])
    return {"threshold": float(threshold), "sensitivity": sens, "specificity": _ratio(c["tn"], c["tn"] + c["fp"]),
            "ppv": ppv, "npv": _ratio(c["tn"], c["tn"] + c["fn"]), "f1": f1, **c}


def threshold_for_sensitivity(y_true, scores, target: float = 0.95) -> float:
    """The highest threshold whose sensitivity is at least ``target``.

    With k = ceil(target * positives), it is the k-th highest melanoma score:
    every melanoma scoring at or above it is called, so at least k are found.
    Choose it on validation data and apply it unchanged elsewhere.
    """
    if not 0.0 < target <= 1.0:
        raise MetricError(f"target sensitivity must be in (0, 1], got {target}")
    y, s = _binary(y_true, scores)
    positives = np.sort(s[y == 1])[::-1]
    k = int(np.ceil(target * len(positives) - 1e-9))
    return float(positives[max(k, 1) - 1])


# --------------------------------------------------------------------------- uncertainty of a metric


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() in ("", "nan")


def bootstrap_groups(groups) -> tuple[np.ndarray, dict]:
    """The bootstrap's resampling unit per image, and a summary of it for the report.

    Images with the same lesion id are resampled together; an image whose lesion id is blank or
    missing (a clinic without lesion ids) is its own group, never pooled with the other blanks
    (which would make one giant "lesion" and collapse the interval).

    Returns:
      ``(group index per image, {"unit": "lesions" | "images" | "lesions and images", "n_groups": N,
      "n_without_lesion_id": M})``.
    """
    raw = np.asarray(groups, dtype=object).reshape(-1)
    blank = np.array([_blank(v) for v in raw], dtype=bool)
    keys = np.array([f"\0image{i}" if b else f"lesion:{v}" for i, (v, b) in enumerate(zip(raw, blank))], dtype=object)
    _, index = np.unique(keys.astype(str), return_inverse=True)
    n_groups = int(index.max() + 1) if len(index) else 0
    unit = "images" if blank.all() else "lesions and images" if blank.any() else "lesions"
    if unit == "lesions" and n_groups == len(raw):
        unit = "images"  # every image its own lesion: resampling lesions is resampling images
    return index, {"unit": unit, "n_groups": n_groups, "n_without_lesion_id": int(blank.sum())}


def bootstrap_ci(y_true, scores, groups, metric, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of ``metric(y, scores)``, resampling lesions (groups) with replacement.

    Groups come from :func:`bootstrap_groups` (a blank lesion id is its own group). Resamples
    where one class is absent are drawn again (they are not counted).
    """
    y = np.asarray(y_true).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    group_index, _ = bootstrap_groups(groups)
    members = [np.flatnonzero(group_index == g) for g in range(group_index.max() + 1)]
    rng = np.random.default_rng(seed)
    values = []
    attempts = 0
    while len(values) < n_boot and attempts < 20 * n_boot:
        attempts += 1
        drawn = rng.integers(0, len(members), len(members))
        rows = np.concatenate([members[g] for g in drawn])
        if len(np.unique(y[rows])) < 2:
            continue
        values.append(metric(y[rows], s[rows]))
    if not values:
        raise MetricError("bootstrap: no resample contained both classes")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


# --------------------------------------------------------------------------- calibration


def brier(y_true, probs) -> float:
    """Mean squared difference between the melanoma probability and the label."""
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    return float(np.mean((np.asarray(probs, dtype=np.float64).reshape(-1) - y) ** 2))


def reliability_bins(y_true, probs, n_bins: int = 10) -> list[dict]:
    """Equal-mass bins (sorted by probability): mean probability, observed rate, count."""
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    order = np.argsort(p, kind="stable")
    return [{"mean_prob": float(p[b].mean()), "observed": float(y[b].mean()), "count": int(len(b))}
            for b in np.array_split(order, min(n_bins, len(p))) if len(b)]


def ece(y_true, probs, n_bins: int = 10) -> float:
    """Expected calibration error with equal-mass bins: sum over bins of (n_b / N) |rate - mean prob|."""
    bins = reliability_bins(y_true, probs, n_bins)
    total = sum(b["count"] for b in bins)
    return float(sum(b["count"] / total * abs(b["observed"] - b["mean_prob"]) for b in bins))


def fit_temperature(logits, y_true, labels: str = "binary") -> float:
    """Temperature T > 0 minimising the NLL of sigmoid(z / T) (softmax for multiclass) on validation data."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true).reshape(-1)

    def nll(log_t: float) -> float:
        t = np.exp(log_t)
        if labels == "binary":
            zz = z.reshape(-1) / t
            return float(np.mean(np.logaddexp(0, zz) - y * zz))
        zz = z / t
        log_p = zz - np.logaddexp.reduce(zz, axis=1, keepdims=True)
        return float(-np.mean(log_p[np.arange(len(y)), y.astype(int)]))

    result = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(result.x))


def fit_platt(logits, y_true) -> tuple[float, float]:
    """Platt scaling: (a, b) minimising the NLL of sigmoid(a z + b) on validation data.

    Unlike a temperature, the intercept b also corrects a shifted base rate, as
    left by class-weighted training (HAM10000 is 8% melanoma).
    """
    from scipy.optimize import minimize

    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)

    def nll(params):
        zz = params[0] * z + params[1]
        return float(np.mean(np.logaddexp(0, zz) - y * zz))

    result = minimize(nll, x0=np.array([1.0, 0.0]), method="L-BFGS-B")
    return float(result.x[0]), float(result.x[1])


# --------------------------------------------------------------------------- referral


def refer_margin(logits, threshold_logit: float, fraction: float) -> float:
    """Half-width of a band around the threshold (in logit units) holding ``fraction`` of the images."""
    distance = np.abs(np.asarray(logits, dtype=np.float64).reshape(-1) - threshold_logit)
    return float(np.quantile(distance, fraction)) if fraction > 0 else 0.0


def refer_summary(y_true, logits, threshold_logit: float, margin: float) -> dict:
    """Images within ``margin`` of the threshold are referred; rates on the images decided automatically."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(y_true).reshape(-1)
    refer = np.abs(z - threshold_logit) < margin
    kept = ~refer
    rates = rates_at(y[kept], z[kept], threshold_logit) if kept.any() else {}
    return {"refer_fraction": float(refer.mean()), "refer_margin_logit": float(margin),
            "decided_sensitivity": rates.get("sensitivity", float("nan")),
            "decided_specificity": rates.get("specificity", float("nan")),
            "referred_melanomas": int(np.sum(refer & (y == 1)))}


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


# --------------------------------------------------------------------------- multiclass


def multiclass_report(y_true, probs, label_names: list[str]) -> dict:
    """BMA, macro AP, per-class one-vs-rest AUC, macro F1, accuracy and the confusion matrix (rows: truth)."""
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    predicted = np.argmax(p, axis=1)
    per_class = {}
    for k, name in enumerate(label_names):
        positives = y == k
        per_class[name] = float(skm.roc_auc_score(positives, p[:, k])) if 0 < positives.sum() < len(y) else None
    present = [k for k in range(len(label_names)) if 0 < np.sum(y == k) < len(y)]
    ap = [skm.average_precision_score(y == k, p[:, k]) for k in present]
    return {"bma": float(skm.balanced_accuracy_score(y, predicted)),
            "ap": float(np.mean(ap)) if ap else float("nan"),  # macro average precision (one-vs-rest)
            "macro_f1": float(skm.f1_score(y, predicted, average="macro", labels=np.unique(y))),
            "accuracy": float(np.mean(predicted == y)),
            "per_class_auc": per_class,
            "confusion_matrix": skm.confusion_matrix(y, predicted, labels=range(len(label_names))).tolist()}


# --------------------------------------------------------------------------- subgroups


def age_band(age) -> str:
    try:
        a = float(age)
    except (TypeError, ValueError):
        return "unknown"
    if not np.isfinite(a):
        return "unknown"
    for upper, name in ((30, "<30"), (45, "30-44"), (60, "45-59"), (75, "60-74")):
        if a < upper:
            return name
    return "75+"


def subgroup_audit(frame, threshold: float, columns=("sex", "age_band", "localization", "dataset"),
                   max_drop: float = 0.05) -> list[dict]:
    """AUC and sensitivity at the fixed threshold per subgroup, flagging sensitivity drops.

    Args:
      frame: a DataFrame with ``label``, ``prob`` and the metadata columns.
      threshold: the validation-chosen threshold.
      max_drop: flag groups whose sensitivity is more than this below the overall one.
    """
    overall = rates_at(frame["label"], frame["prob"], threshold)["sensitivity"]
    rows = []
    for column in columns:
        if column not in frame.columns:
            continue
        for value, part in frame.groupby(column, dropna=False):
            n_pos = int(part["label"].sum())
            auc = (float(skm.roc_auc_score(part["label"], part["prob"]))
                   if 0 < n_pos < len(part) else float("nan"))
            sens = rates_at(part["label"], part["prob"], threshold)["sensitivity"] if n_pos else float("nan")
            rows.append({"attribute": column, "group": str(value), "n": int(len(part)), "n_melanoma": n_pos,
                         "roc_auc": auc, "sensitivity": sens,
                         "flag": bool(np.isfinite(sens) and sens < overall - max_drop)})
    return rows
