"""Classification metrics as pure functions of labels and scores (NumPy in, floats out)."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


class MetricError(ValueError):
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
    """Area under the ROC curve (ties count one half)."""
    y, s = _binary(y_true, scores)
    return float(skm.roc_auc_score(y, s))


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
    """ROC-AUC and PR-AUC (macro one-vs-rest for multiclass, plus BMA) from logits."""
    if labels == "binary":
        p = sigmoid(np.reshape(logits, -1))
        return {"roc_auc": roc_auc(y_true, p), "pr_auc": pr_auc(y_true, p)}
    p = softmax(logits)
    return {"roc_auc": multiclass_auc(y_true, p), "pr_auc": multiclass_ap(y_true, p),
            "bma": balanced_accuracy(y_true, p)}
