"""Relational distillation losses: CRCKD's CCD and CRP, and the CRD, SP and FitNet baselines.

Xing et al., "Categorical Relation-Preserving Contrastive Knowledge Distillation
for Medical Image Classification" (MICCAI 2021):

- CCD (class-guided contrastive distillation, Eq. 1-2): student and teacher
  embeddings are projected to ``d`` dims and L2-normalised; each model keeps a
  memory bank of one row per training image. For each sample the anchor of
  one model is contrasted with ``k_pos`` positives (the sample itself first,
  then images of the same class) and ``k_neg`` negatives (other classes) drawn
  from the *other* model's bank, with the NCE objective
  ``h = e / (e + k_neg / M)``, ``e = exp(v . u / tau) / Z``, ``M`` the
  number of training images and ``Z`` a normaliser fixed on the first batch.
  Both directions (teacher anchor on the student bank, and back) are summed.
- CRP (categorical relation preserving, Eq. 3-5): class centroids are the
  means of each class's (ReLU'd) bank rows, L2-normalised; each sample's
  relation is the softmax over its cosine similarities to the K centroids
  divided by tau; the loss is KL(teacher relation || student relation).
- CRD (Tian et al. 2020): CCD's machinery with one positive (the sample
  itself) and negatives drawn uniformly from all other images.
- SP (Tung & Mori 2019): the batch similarity (Gram) matrices of the two
  models' features, row-normalised; squared Frobenius distance / B^2.
- FitNet (Romero et al. 2015): a regressor (1x1 convolution, after resizing to
  the teacher's grid) maps the student's hint feature map to the teacher's; MSE.

Every function here is plain TensorFlow on tensors, so the tests compare it
with numpy on hand-made embeddings.
"""

from __future__ import annotations

import math

import numpy as np

from melanoma_tf.backend import tf

EPS = 1e-7


def l2_normalize(x: tf.Tensor) -> tf.Tensor:
    return tf.math.l2_normalize(x, axis=-1, epsilon=1e-12)


def init_bank(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """A memory bank's initial rows: uniform in +-1/sqrt(dim/3) (unit expected norm), as CRD initialises it."""
    bound = 1.0 / math.sqrt(dim / 3.0)
    return np.random.default_rng(seed).uniform(-bound, bound, (n, dim)).astype(np.float32)


def bank_rows_update(bank: tf.Tensor, index: tf.Tensor, values: tf.Tensor, momentum: float) -> tf.Tensor:
    """New rows for ``index``: momentum blend of the old rows with ``values``, L2-normalised."""
    old = tf.gather(bank, index)
    return l2_normalize(momentum * old + (1.0 - momentum) * values)


def update_bank(bank: tf.Variable, index: tf.Tensor, values: tf.Tensor, momentum: float) -> None:
    """Writes the batch's rows of ``bank`` (and only those)."""
    new_rows = bank_rows_update(bank, index, tf.stop_gradient(values), momentum)
    bank.scatter_update(tf.IndexedSlices(new_rows, tf.cast(index, tf.int32)))


class ClassSampler:
    """Draws contrast indices into a memory bank by class, with replacement, inside the graph.

    Args:
      labels: the class of every bank row (training image), shape ``(N,)``.
    """

    def __init__(self, labels: np.ndarray):
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        self.n = len(labels)
        self.num_classes = int(labels.max()) + 1
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=self.num_classes)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.labels = tf.constant(labels.astype(np.int32))
        self.order = tf.constant(order.astype(np.int32))
        self.counts = tf.constant(counts.astype(np.int32))
        self.starts = tf.constant(starts.astype(np.int32))

    def _uniform(self, shape, upper: tf.Tensor, seed=None) -> tf.Tensor:
        """Integers uniform in [0, upper) per row (upper: shape (B, 1))."""
        u = tf.random.uniform(shape, 0.0, 1.0, seed=seed)
        r = tf.cast(tf.floor(u * tf.cast(upper, tf.float32)), tf.int32)
        return tf.minimum(r, tf.maximum(upper - 1, 0))

    def class_guided(self, index: tf.Tensor, k_pos: int, k_neg: int) -> tf.Tensor:
        """CCD: ``(B, k_pos + k_neg)`` bank rows: the sample itself, k_pos - 1 of its class, k_neg of others."""
        index = tf.cast(tf.reshape(index, [-1]), tf.int32)
        batch = tf.shape(index)[0]
        label = tf.gather(self.labels, index)
        start = tf.gather(self.starts, label)[:, None]
        count = tf.gather(self.counts, label)[:, None]
        parts = [index[:, None]]
        if k_pos > 1:
            r = self._uniform([batch, k_pos - 1], count)
            parts.append(tf.gather(self.order, start + r))
        if k_neg > 0:
            r = self._uniform([batch, k_neg], self.n - count)
            skip = tf.cast(r >= start, tf.int32) * count  # jump over the sample's own class block
            parts.append(tf.gather(self.order, r + skip))
        return tf.concat(parts, axis=1)

    def uniform(self, index: tf.Tensor, k_neg: int) -> tf.Tensor:
        """CRD: ``(B, 1 + k_neg)``: the sample itself, then k_neg other images of any class."""
        index = tf.cast(tf.reshape(index, [-1]), tf.int32)
        batch = tf.shape(index)[0]
        r = self._uniform([batch, k_neg], tf.fill([batch, 1], self.n - 1))
        others = r + tf.cast(r >= index[:, None], tf.int32)
        return tf.concat([index[:, None], others], axis=1)


def contrast_scores(anchor: tf.Tensor, bank: tf.Tensor, contrast_index: tf.Tensor, tau: float) -> tf.Tensor:
    """``exp(bank[idx] . anchor / tau)``, shape ``(B, K)`` (before dividing by Z)."""
    rows = tf.stop_gradient(tf.gather(bank, contrast_index))  # (B, K, d)
    return tf.exp(tf.einsum("bkd,bd->bk", rows, anchor) / tau)


def nce_loss(scores: tf.Tensor, k_pos: int, n_data: int) -> tf.Tensor:
    """The NCE objective of CRCKD Eq. 2 on normalised scores ``(B, k_pos + k_neg)``.

    ``-mean_b [ mean_p log h(pos) + sum_n log (1 - h(neg)) ]`` with
    ``h(x) = x / (x + k_neg / M)``.
    """
    k_neg = scores.shape[1] - k_pos
    noise = k_neg / float(n_data)
    positive = scores[:, :k_pos]
    negative = scores[:, k_pos:]
    log_pos = tf.math.log(positive / (positive + noise + EPS))
    log_neg = tf.math.log(noise / (negative + noise + EPS))
    return -tf.reduce_mean(tf.reduce_mean(log_pos, axis=1) + tf.reduce_sum(log_neg, axis=1))


def contrastive_loss(f_s: tf.Tensor, f_t: tf.Tensor, bank_s: tf.Tensor, bank_t: tf.Tensor,
                     contrast_index: tf.Tensor, k_pos: int, tau: float, n_data: int,
                     z_s: tf.Tensor, z_t: tf.Tensor) -> tf.Tensor:
    """CCD (or CRD with k_pos = 1 and uniform negatives), both directions summed.

    Args:
      f_s, f_t: L2-normalised projections of the batch, ``(B, d)``.
      bank_s, bank_t: memory banks ``(N, d)``.
      contrast_index: ``(B, k_pos + k_neg)`` rows, positives first.
      z_s, z_t: the normalisers of the student-anchor and teacher-anchor scores.
    """
    student_anchor = contrast_scores(f_s, bank_t, contrast_index, tau) / z_s
    teacher_anchor = contrast_scores(f_t, bank_s, contrast_index, tau) / z_t
    return nce_loss(student_anchor, k_pos, n_data) + nce_loss(teacher_anchor, k_pos, n_data)


def class_centroids(bank: tf.Tensor, labels: tf.Tensor, num_classes: int) -> tf.Tensor:
    """L2-normalised mean of the ReLU'd bank rows of each class, ``(K, d)``; no gradient."""
    rows = tf.nn.relu(tf.stop_gradient(bank))
    sums = tf.math.unsorted_segment_sum(rows, labels, num_classes)
    counts = tf.math.unsorted_segment_sum(tf.ones_like(rows[:, :1]), labels, num_classes)
    return l2_normalize(sums / tf.maximum(counts, 1.0))


def relation_logits(f: tf.Tensor, centroids: tf.Tensor, tau: float) -> tf.Tensor:
    """Cosine similarity of each (normalised) sample to each centroid, over tau: ``(B, K)``."""
    return tf.matmul(f, centroids, transpose_b=True) / tau


def kl_divergence(p_logits: tf.Tensor, q_logits: tf.Tensor) -> tf.Tensor:
    """Batch mean of KL(softmax(p) || softmax(q)); p is the target (no gradient)."""
    p = tf.nn.softmax(tf.stop_gradient(p_logits), axis=-1)
    log_p = tf.nn.log_softmax(tf.stop_gradient(p_logits), axis=-1)
    log_q = tf.nn.log_softmax(q_logits, axis=-1)
    return tf.reduce_mean(tf.reduce_sum(p * (log_p - log_q), axis=-1))


def crp_loss(f_s: tf.Tensor, f_t: tf.Tensor, bank_s: tf.Tensor, bank_t: tf.Tensor, labels: tf.Tensor,
             num_classes: int, tau: float) -> tf.Tensor:
    """CRP: KL(teacher's relation to the teacher-bank centroids || student's to the student-bank centroids)."""
    rel_s = relation_logits(f_s, class_centroids(bank_s, labels, num_classes), tau)
    rel_t = relation_logits(f_t, class_centroids(bank_t, labels, num_classes), tau)
    return kl_divergence(rel_t, rel_s)


def _flat(x: tf.Tensor) -> tf.Tensor:
    return tf.reshape(x, [tf.shape(x)[0], -1])


def similarity_matrix(features: tf.Tensor) -> tf.Tensor:
    """Row-normalised batch Gram matrix of flattened features, ``(B, B)``."""
    flat = _flat(features)
    return l2_normalize(tf.matmul(flat, flat, transpose_b=True))


def sp_loss(feat_s: tf.Tensor, feat_t: tf.Tensor) -> tf.Tensor:
    """Similarity-preserving KD: ``||G_s - G_t||_F^2 / B^2``."""
    batch = tf.cast(tf.shape(feat_s)[0], tf.float32)
    diff = similarity_matrix(feat_s) - tf.stop_gradient(similarity_matrix(feat_t))
    return tf.reduce_sum(tf.square(diff)) / (batch * batch)


def fitnet_loss(hint_s: tf.Tensor, hint_t: tf.Tensor, regressor) -> tf.Tensor:
    """FitNet: MSE between the regressed student hint (resized to the teacher's grid) and the teacher's."""
    size = tf.shape(hint_t)[1:3]
    resized = tf.image.resize(hint_s, size, method="bilinear")
    return tf.reduce_mean(tf.square(regressor(resized) - tf.stop_gradient(hint_t)))


def rampup(epoch, length: float) -> float:
    """The sigmoid-shaped ramp ``exp(-5 (1 - t/T)^2)`` for t < T, then 1 (Laine & Aila; CRCKD)."""
    if length <= 0:
        return 1.0
    t = min(max(float(epoch), 0.0), float(length)) / float(length)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def ema_decay(step: int, decay: float) -> float:
    """Mean-teacher decay at ``step``: the true average early on, ``decay`` once 1 - 1/(step+1) exceeds it."""
    return min(1.0 - 1.0 / (step + 1.0), decay)


def relation_ratio(features: np.ndarray, labels: np.ndarray) -> dict:
    """Cosine-similarity matrix statistics: Rd = mean intra-class / mean inter-class similarity.

    The diagonal (a sample with itself) is left out of the intra-class mean.
    """
    f = np.asarray(features, np.float64).reshape(len(features), -1)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    sim = f @ f.T
    labels = np.asarray(labels).reshape(-1)
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(f), dtype=bool)
    intra = float(sim[same & off_diagonal].mean()) if (same & off_diagonal).any() else float("nan")
    inter = float(sim[~same].mean()) if (~same).any() else float("nan")
    return {"intra": intra, "inter": inter, "rd": intra / inter if inter else float("nan")}
