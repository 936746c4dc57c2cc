"""Student and distillation losses, as pure functions of labels and logits.

All functions take arrays (NumPy or tensors) and return a scalar tensor: the
mean over the batch of the per-sample loss times its sample weight (Keras's
``sum_over_batch_size``). Binary labels have shape ``(batch, 1)`` or
``(batch,)``; multiclass labels are integer class indices.
"""

from __future__ import annotations

from typing import Callable, Optional

from melanoma_tf.backend import tf


def _reduce(per_sample: tf.Tensor, sample_weight) -> tf.Tensor:
    per_sample = tf.reshape(per_sample, [-1])
    if sample_weight is not None:
        per_sample = per_sample * tf.reshape(tf.cast(sample_weight, per_sample.dtype), [-1])
    return tf.reduce_mean(per_sample)


def _binary_inputs(y, logits):
    logits = tf.reshape(tf.convert_to_tensor(logits, tf.float32), [-1])
    y = tf.reshape(tf.cast(y, tf.float32), [-1])
    return y, logits


def bce(y, logits, sample_weight=None) -> tf.Tensor:
    """Binary cross-entropy on one logit: -[y log p + (1 - y) log(1 - p)], p = sigmoid(z)."""
    y, logits = _binary_inputs(y, logits)
    return _reduce(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits), sample_weight)


def weighted_bce(y, logits, pos_weight: float = 0.7, sample_weight=None) -> tf.Tensor:
    """Weighted BCE: melanoma terms weighted by w, non-melanoma terms by 1 - w."""
    y, logits = _binary_inputs(y, logits)
    # -log p = softplus(-z), -log(1 - p) = softplus(z): stable for large |z|.
    per_sample = pos_weight * y * tf.nn.softplus(-logits) + (1 - pos_weight) * (1 - y) * tf.nn.softplus(logits)
    return _reduce(per_sample, sample_weight)


def focal(y, logits, gamma: float = 2.0, alpha: Optional[float] = None, sample_weight=None) -> tf.Tensor:
    """Binary focal loss (Lin et al. 2017): -a_t (1 - p_t)^gamma log p_t.

    ``alpha`` weights melanoma terms by alpha and the rest by 1 - alpha; None: no class weighting.
    """
    y, logits = _binary_inputs(y, logits)
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits)
    p = tf.sigmoid(logits)
    p_t = y * p + (1 - y) * (1 - p)
    per_sample = tf.pow(1 - p_t, gamma) * ce
    if alpha is not None:
        per_sample = (y * alpha + (1 - y) * (1 - alpha)) * per_sample
    return _reduce(per_sample, sample_weight)


def _multiclass_inputs(y, logits):
    logits = tf.convert_to_tensor(logits, tf.float32)
    y = tf.reshape(tf.cast(y, tf.int32), [-1])
    return y, logits


def softmax_ce(y, logits, sample_weight=None) -> tf.Tensor:
    """Softmax cross-entropy with integer labels."""
    y, logits = _multiclass_inputs(y, logits)
    return _reduce(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits), sample_weight)


def weighted_ce(y, logits, class_weights, sample_weight=None) -> tf.Tensor:
    """Softmax cross-entropy with a per-class weight on each sample's true class."""
    y, logits = _multiclass_inputs(y, logits)
    per_sample = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
    per_sample = per_sample * tf.gather(tf.constant(class_weights, tf.float32), y)
    return _reduce(per_sample, sample_weight)


def focal_multiclass(y, logits, gamma: float = 2.0, alpha: Optional[float] = None,
                     sample_weight=None) -> tf.Tensor:
    """Multiclass focal loss: -(1 - p_y)^gamma log p_y (alpha scales every term if given)."""
    y, logits = _multiclass_inputs(y, logits)
    log_p = tf.nn.log_softmax(logits)
    log_p_y = tf.gather(log_p, y, batch_dims=1)
    per_sample = -tf.pow(1 - tf.exp(log_p_y), gamma) * log_p_y
    if alpha is not None:
        per_sample = alpha * per_sample
    return _reduce(per_sample, sample_weight)


def kd_binary(teacher_logits, student_logits, temperature: float) -> tf.Tensor:
    """Binary KD: BCE between sigmoid(z_t / T) (soft target) and sigmoid(z_s / T).

    Softmax over a single logit is identically 1, so the multiclass KD formula
    would give zero here. The caller multiplies by T^2.
    """
    t, s = _binary_inputs(teacher_logits, student_logits)
    soft_target = tf.sigmoid(t / temperature)
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=soft_target, logits=s / temperature))


def kd_softmax(teacher_logits, student_logits, temperature: float) -> tf.Tensor:
    """Multiclass KD (Hinton et al.): KL(softmax(z_t / T) || softmax(z_s / T)); the caller multiplies by T^2."""
    t = tf.convert_to_tensor(teacher_logits, tf.float32) / temperature
    s = tf.convert_to_tensor(student_logits, tf.float32) / temperature
    p_t = tf.nn.softmax(t)
    kl = tf.reduce_sum(p_t * (tf.nn.log_softmax(t) - tf.nn.log_softmax(s)), axis=-1)
    return tf.reduce_mean(kl)


LossFn = Callable[..., tf.Tensor]

# Binary and multiclass versions behind the same config names.
LOSSES: dict[str, dict[str, LossFn]] = {
    "binary": {"bce": bce, "wbce": weighted_bce, "focal": focal},
    "multiclass": {"bce": softmax_ce, "wbce": weighted_ce, "focal": focal_multiclass},
}
KD_LOSSES: dict[str, LossFn] = {"binary": kd_binary, "multiclass": kd_softmax}


def student_loss(name: str, labels: str, *, pos_weight: float = 0.7, gamma: float = 2.0,
                 focal_alpha: Optional[float] = None, class_weights=None) -> LossFn:
    """Returns ``f(y, logits, sample_weight=None)`` for a config's ``loss`` section.

    Args:
      name: ``bce`` | ``wbce`` | ``focal`` (softmax CE, class-weighted CE and
        multiclass focal in multiclass mode).
      labels: ``binary`` | ``multiclass``.
      pos_weight: w of weighted BCE.
      gamma, focal_alpha: focal loss parameters.
      class_weights: per-class weights for multiclass ``wbce``.
    """
    try:
        fn = LOSSES[labels][name]
    except KeyError:
        raise ValueError(f"loss.name: unknown loss {name!r} for {labels} labels; "
                         f"choose from {sorted(LOSSES.get(labels, {}))}") from None
    if fn is weighted_bce:
        return lambda y, z, sample_weight=None: weighted_bce(y, z, pos_weight, sample_weight)
    if fn is weighted_ce:
        if class_weights is None:
            raise ValueError("loss.name: wbce in multiclass mode needs class weights from the training split")
        return lambda y, z, sample_weight=None: weighted_ce(y, z, class_weights, sample_weight)
    if fn in (focal, focal_multiclass):
        return lambda y, z, sample_weight=None: fn(y, z, gamma, focal_alpha, sample_weight)
    return fn
