"""Logit knowledge distillation: the Distiller, which trains a student with a frozen teacher (or alone).

Loss = alpha * student_loss(y, z_s) + (1 - alpha) * T^2 * KD(z_t / T, z_s / T).

Without a teacher (and without cached teacher logits) the Distiller is plain
supervised training of ``student``, which is how the ``teacher`` and
``student`` stages run too: one training path, one set of loss trackers.
The Distiller is never saved or quantized; ``student`` is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from melanoma_tf.backend import keras, tf
from melanoma_tf.config import Config
from melanoma_tf.data import PreparedData
from melanoma_tf.distill import teachers
from melanoma_tf.distill.base import Method, QatPlan
from melanoma_tf.losses import KD_LOSSES


class Distiller(keras.Model):
    """Knowledge distillation with an overridden ``compute_loss``.

    Args:
      student: the Functional model being trained (outputs logits).
      student_loss: ``f(y, logits, sample_weight)``.
      teacher: a Functional model (outputs logits); frozen here. May be None
        when the inputs carry cached ``teacher_logits`` or when alpha is 1.
      alpha: weight of the student loss in [0, 1].
      temperature: KD temperature T > 0.
      labels: ``binary`` (sigmoid KD on one logit) or ``multiclass`` (softmax KD).

    Inputs are an image batch, or ``{"image": ..., "teacher_logits": ...}``
    for offline KD with cached teacher outputs.
    """

    def __init__(self, student: keras.Model, student_loss: Callable, teacher: Optional[keras.Model] = None,
                 alpha: float = 1.0, temperature: float = 1.0, labels: str = "binary", **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distill.alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"distill.temperature must be > 0, got {temperature}")
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.trainable = False
        self.student_loss_fn = student_loss
        self.kd_loss_fn = KD_LOSSES[labels]
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.student_loss_tracker = keras.metrics.Mean(name="student_loss")
        self.kd_loss_tracker = keras.metrics.Mean(name="kd_loss")

    @property
    def distilling(self) -> bool:
        return self.alpha < 1.0

    @property
    def metrics(self):
        trackers = [self.loss_tracker, self.student_loss_tracker]
        return trackers + [self.kd_loss_tracker] if self.distilling else trackers

    @staticmethod
    def _image(inputs):
        return inputs["image"] if isinstance(inputs, dict) else inputs

    def call(self, inputs, training=False):
        return self.student(self._image(inputs), training=training)

    def teacher_logits(self, inputs) -> tf.Tensor:
        """Cached logits from the inputs if present, else the frozen teacher's output."""
        if isinstance(inputs, dict) and "teacher_logits" in inputs:
            return tf.stop_gradient(tf.convert_to_tensor(inputs["teacher_logits"], tf.float32))
        if self.teacher is None:
            raise ValueError("distillation needs a teacher model or cached teacher_logits in the inputs")
        return tf.stop_gradient(self.teacher(self._image(inputs), training=False))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None):
        student_term = self.student_loss_fn(y, y_pred, sample_weight=sample_weight)
        total = student_term
        if self.distilling:
            kd_term = self.kd_loss_fn(self.teacher_logits(x), y_pred, self.temperature)
            total = self.alpha * student_term + (1.0 - self.alpha) * self.temperature ** 2 * kd_term
            self.kd_loss_tracker.update_state(kd_term)
        regularization = self.student.losses
        if regularization:
            total = total + tf.add_n(regularization)
        self.loss_tracker.update_state(total)
        self.student_loss_tracker.update_state(student_term)
        # Under tf.distribute each replica returns its own batch mean and the optimizer
        # sums the replicas' gradients: scale so the update equals one big-batch step.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return total / replicas if replicas > 1 else total

    def compute_metrics(self, x, y, y_pred, sample_weight):
        return self.get_metrics_result()


class Supervised(Method):
    """The ``teacher`` and ``student`` stages: the student loss alone (the Distiller with alpha 1)."""

    name = "none"

    def trainer(self, student, loss_fn, train_labels, teacher):
        return Distiller(student, loss_fn, temperature=self.cfg.distill.temperature, labels=self.cfg.data.labels)


class LogitKD(Method):
    """``distill.method: kd``: the student loss plus temperature-scaled KD on the teacher's logits.

    The teacher is one ``.keras`` model or the logit mean of several, either run on
    every batch (``teacher_outputs: online``) or run once over the training split,
    unaugmented, at its own resolution (``cached``, optionally with 4-flip TTA).
    """

    name = "kd"

    def __init__(self, cfg: Config, teacher_paths: Optional[list[Path]] = None):
        super().__init__(cfg, teacher_paths)
        self.cached: Optional[np.ndarray] = None
        self.teacher_scores: dict = {}

    def build_teacher(self, image_size: int) -> Optional[keras.Model]:
        if self.cfg.distill.teacher_outputs == "online":
            return teachers.load_teacher(self.teacher_paths, image_size)
        return None

    def prepare(self, data: PreparedData, folder: Path) -> None:
        # loaded once, at its own resolution, for the cached training logits and the validation score
        size = teachers.teacher_resolution(self.teacher_paths, self.cfg)
        teacher = teachers.load_teacher(self.teacher_paths, size)
        if self.cfg.distill.teacher_outputs == "cached":
            self.cached = teachers.cache_teacher_logits(
                teacher, data, self.cfg, folder, size, self.cfg.distill.teacher_tta,
                teachers.shared_cache_file(self.cfg, self.teacher_paths, size))
        self.teacher_scores = teachers.teacher_validation(teacher, size, data, self.cfg)

    def summary(self) -> dict:
        return self.teacher_scores

    def dataset_options(self) -> dict:
        return {"teacher_logits": self.cached}

    def trainer(self, student, loss_fn, train_labels, teacher):
        return Distiller(student, loss_fn, teacher=teacher, alpha=self.cfg.distill.alpha,
                         temperature=self.cfg.distill.temperature, labels=self.cfg.data.labels)

    def qat_plan(self, stage_dir: Path) -> QatPlan:
        files = teachers.run_teacher_files(self.cfg, stage_dir)
        return QatPlan(files, f"logit KD from the run's teacher ({', '.join(f.name for f in files)})",
                       self.cfg.distill.alpha)
