"""The relational Distiller: CRCKD (mean teacher, CCD, CRP) and the CRD, SP and FitNet baselines.

Total loss, per step (CRCKD's Eq. 6, plus the baselines' terms when weighted)::

    L = L_student + l1(t) L_KL + l2(t) L_CCD + l3(t) L_CRP + w_crd L_CRD + w_sp L_SP + w_fitnet L_FitNet

with ``l1 = kl_weight * ramp(t)``, ``l3 = crp_weight * ramp(t)``, ``ramp(t) =
exp(-5 (1 - t/T)^2)`` over the first ``T = rampup_epochs`` epochs, and
``l2 = ccd_weight`` before T, ``ccd_weight_after`` from then on. The teacher is
either a fixed trained model (``teacher_mode: fixed``) or the mean teacher, an
exponential moving average of the student's weights (``mean_teacher``). The
student and the teacher see two independent augmentations of each image when
the inputs carry ``image_teacher``.

Projection heads, memory banks, the FitNet regressor and the mean teacher live
here and are checkpointed with the student (:meth:`state`); only the student
is exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from melanoma_tf import models
from melanoma_tf.backend import keras, tf
from melanoma_tf.config import ConfigError
from melanoma_tf.distill import relational_losses as R
from melanoma_tf.distill import teachers
from melanoma_tf.distill.base import Method, QatPlan
from melanoma_tf.distill.teachers import resized_input
from melanoma_tf.losses import KD_LOSSES

_POOLS = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)


def feature_model(model: keras.Model, image_size: int, hint_layer: Optional[str] = None) -> keras.Model:
    """``image -> [logits, embedding, hint map]`` sharing ``model``'s layers.

    The embedding is the input of the head's dropout (the pooled features, or
    the hidden head layer); the hint map is ``hint_layer``'s output, by default
    the last feature map before global pooling.
    """
    pool = next((layer for layer in model.layers if isinstance(layer, _POOLS)), None)
    if pool is None or "head_dropout" not in [layer.name for layer in model.layers]:
        raise ValueError(f"{model.name}: relational distillation needs a model built by melanoma_tf "
                         "(a global pooling layer and a 'head_dropout' layer)")
    embedding = model.get_layer("head_dropout").input
    hint = model.get_layer(hint_layer).output if hint_layer else pool.input
    inner = keras.Model(model.inputs, [model.output, embedding, hint], name=f"{model.name}_features")
    return resized_input(inner, image_size, f"{model.name}_resize")


def mean_teacher_copy(student: keras.Model) -> keras.Model:
    """A frozen copy of the student with the same weights (the mean teacher's starting point)."""
    teacher = keras.models.clone_model(student)
    teacher.set_weights(student.get_weights())
    teacher.trainable = False
    teacher._name = "mean_teacher"
    return teacher


class RelationalDistiller(keras.Model):
    """Relational knowledge distillation with a custom ``train_step``.

    Args:
      student: the Functional model being trained.
      student_loss: ``f(y, logits, sample_weight)`` (class-weighted CE in the paper).
      train_labels: integer class of every training image (memory-bank rows), in
        the order of the ``index`` input.
      cfg: the ``relational`` config section.
      image_size: input side of the batches.
      teacher: a trained teacher for ``teacher_mode: fixed``; None for the mean teacher.
      temperature: temperature of the KL term.
      labels: ``binary`` or ``multiclass``.
      seed: initialisation seed of the memory banks.

    Inputs: ``{"image", "index"}`` and optionally ``"image_teacher"`` (the second view).
    """

    def __init__(self, student: keras.Model, student_loss: Callable, train_labels: np.ndarray, cfg,
                 image_size: int, teacher: Optional[keras.Model] = None, temperature: float = 1.0,
                 labels: str = "binary", seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.cfg = cfg
        self.student = student
        self.student_loss_fn = student_loss
        self.kd_loss_fn = KD_LOSSES[labels]
        self.temperature = float(temperature)
        if cfg.teacher_mode == "mean_teacher":
            teacher = mean_teacher_copy(student)
            self.ema = teacher
        elif teacher is None:
            raise ValueError("relational.teacher_mode fixed needs a trained teacher (distill.teacher)")
        else:
            self.ema = None
        teacher.trainable = False
        self.teacher = teacher
        self.student_features = feature_model(student, image_size, cfg.fitnet_student_layer)
        self.teacher_features = feature_model(teacher, image_size, cfg.fitnet_teacher_layer)
        self.n_data = int(len(train_labels))
        self.sampler = R.ClassSampler(train_labels)
        self.num_classes = self.sampler.num_classes
        self.uses_bank = cfg.ccd_weight > 0 or cfg.ccd_weight_after > 0 or cfg.crp_weight > 0 or cfg.crd_weight > 0
        d = cfg.feat_dim
        self.proj_s = keras.layers.Dense(d, name="proj_student")
        self.proj_t = keras.layers.Dense(d, name="proj_teacher")
        self.bank_s = tf.Variable(R.init_bank(self.n_data, d, seed), trainable=False, name="bank_student")
        self.bank_t = tf.Variable(R.init_bank(self.n_data, d, seed + 1), trainable=False, name="bank_teacher")
        self.z = tf.Variable([-1.0, -1.0, -1.0, -1.0], trainable=False, name="nce_normalisers")  # CCD s,t; CRD s,t
        self.regressor = None
        if cfg.fitnet_weight > 0:
            channels = self.teacher_features.output_shape[2][-1]
            self.regressor = keras.layers.Conv2D(channels, 1, use_bias=False, name="fitnet_regressor")
        # Loss weights of the current epoch, set by RelationalSchedule.
        self.lambda_kl = tf.Variable(0.0, trainable=False, name="lambda_kl")
        self.lambda_ccd = tf.Variable(0.0, trainable=False, name="lambda_ccd")
        self.lambda_crp = tf.Variable(0.0, trainable=False, name="lambda_crp")
        self.trackers = {name: keras.metrics.Mean(name=name) for name in self.loss_terms()}
        self._built_heads = False

    # ------------------------------------------------------------------ bookkeeping

    def loss_terms(self) -> list[str]:
        c = self.cfg
        terms = ["loss", "student_loss"]
        for name, on in (("kl_loss", c.kl_weight > 0), ("ccd_loss", c.ccd_weight > 0 or c.ccd_weight_after > 0),
                         ("crp_loss", c.crp_weight > 0), ("crd_loss", c.crd_weight > 0), ("sp_loss", c.sp_weight > 0),
                         ("fitnet_loss", c.fitnet_weight > 0)):
            if on:
                terms.append(name)
        return terms

    @property
    def metrics(self):
        return list(self.trackers.values())

    def build_heads(self) -> None:
        """Creates the projection heads and regressor variables (before an optimizer or checkpoint needs them)."""
        if self._built_heads:
            return
        dims = [shape[-1] for shape in (self.student_features.output_shape[1], self.teacher_features.output_shape[1])]
        self.proj_s.build((None, dims[0]))
        self.proj_t.build((None, dims[1]))
        if self.regressor is not None:
            self.regressor.build((None, None, None, self.student_features.output_shape[2][-1]))
        self._built_heads = True

    def head_variables(self) -> list[tf.Variable]:
        self.build_heads()
        out = []
        if self.uses_bank:
            out += self.proj_s.trainable_variables + self.proj_t.trainable_variables
        if self.regressor is not None:
            out += self.regressor.trainable_variables
        return out

    def train_variables(self) -> list[tf.Variable]:
        return list(self.student.trainable_variables) + self.head_variables()

    def state(self) -> tf.train.Checkpoint:
        """Everything besides the student and the optimizer that a resumed run needs."""
        self.build_heads()
        objects = dict(proj_s=self.proj_s, proj_t=self.proj_t, bank_s=self.bank_s, bank_t=self.bank_t, z=self.z)
        if self.regressor is not None:
            objects["regressor"] = self.regressor
        if self.ema is not None:
            objects["ema"] = self.ema
        return tf.train.Checkpoint(**objects)

    def set_epoch(self, epoch: int) -> dict:
        """Sets the loss weights of this epoch from the schedule; returns them."""
        c = self.cfg
        ramp = R.rampup(epoch, c.rampup_epochs)
        weights = {"lambda_kl": c.kl_weight * ramp, "lambda_crp": c.crp_weight * ramp,
                   "lambda_ccd": c.ccd_weight if epoch < c.rampup_epochs else c.ccd_weight_after}
        for name, value in weights.items():
            getattr(self, name).assign(value)
        return weights

    # ------------------------------------------------------------------ training

    def call(self, inputs, training=False):
        image = inputs["image"] if isinstance(inputs, dict) else inputs
        return self.student(image, training=training)

    def _normalised(self, raw: tf.Tensor, slot: int) -> tf.Tensor:
        """Divides by the NCE normaliser Z, fixing Z from the first batch (mean score x N)."""
        z = self.z[slot]
        z_new = tf.where(z < 0, tf.stop_gradient(tf.reduce_mean(raw)) * self.n_data, z)
        self.z[slot].assign(z_new)
        return raw / z_new

    def _contrastive(self, f_s, f_t, contrast_index, k_pos: int, slot: int) -> tf.Tensor:
        tau = self.cfg.tau
        s_anchor = self._normalised(R.contrast_scores(f_s, self.bank_t, contrast_index, tau), slot)
        t_anchor = self._normalised(R.contrast_scores(f_t, self.bank_s, contrast_index, tau), slot + 1)
        return R.nce_loss(s_anchor, k_pos, self.n_data) + R.nce_loss(t_anchor, k_pos, self.n_data)

    def train_step(self, data):
        inputs, y, sample_weight = data
        c = self.cfg
        image = inputs["image"]
        teacher_image = inputs.get("image_teacher", image)
        index = tf.cast(tf.reshape(inputs["index"], [-1]), tf.int32)
        t_logits, t_emb, t_hint = self.teacher_features(teacher_image, training=False)
        t_logits, t_emb, t_hint = (tf.stop_gradient(t) for t in (t_logits, t_emb, t_hint))
        variables = self.train_variables()
        terms = {}
        with tf.GradientTape() as tape:
            s_logits, s_emb, s_hint = self.student_features(image, training=True)
            terms["student_loss"] = self.student_loss_fn(y, s_logits, sample_weight=sample_weight)
            total = terms["student_loss"]
            if c.kl_weight > 0:
                terms["kl_loss"] = self.temperature ** 2 * self.kd_loss_fn(t_logits, s_logits, self.temperature)
                total += self.lambda_kl * terms["kl_loss"]
            if self.uses_bank:
                f_s = R.l2_normalize(self.proj_s(s_emb))
                f_t = R.l2_normalize(self.proj_t(t_emb))
                if "ccd_loss" in self.trackers:
                    idx = self.sampler.class_guided(index, c.k_pos, c.k_neg)
                    terms["ccd_loss"] = self._contrastive(f_s, f_t, idx, c.k_pos, 0)
                    total += self.lambda_ccd * terms["ccd_loss"]
                if c.crp_weight > 0:
                    terms["crp_loss"] = R.crp_loss(f_s, f_t, self.bank_s, self.bank_t, self.sampler.labels,
                                                   self.num_classes, c.tau)
                    total += self.lambda_crp * terms["crp_loss"]
                if c.crd_weight > 0:
                    idx = self.sampler.uniform(index, c.k_neg)
                    terms["crd_loss"] = self._contrastive(f_s, f_t, idx, 1, 2)
                    total += c.crd_weight * terms["crd_loss"]
            if c.sp_weight > 0:
                terms["sp_loss"] = R.sp_loss(s_hint, t_hint)
                total += c.sp_weight * terms["sp_loss"]
            if c.fitnet_weight > 0:
                terms["fitnet_loss"] = R.fitnet_loss(s_hint, t_hint, self.regressor)
                total += c.fitnet_weight * terms["fitnet_loss"]
            if self.student.losses:
                total += tf.add_n(self.student.losses)
        grads = tape.gradient(total, variables)
        self.optimizer.apply_gradients(zip(grads, variables))
        if self.uses_bank:
            R.update_bank(self.bank_s, index, f_s, c.bank_momentum)
            R.update_bank(self.bank_t, index, f_t, c.bank_momentum)
        if self.ema is not None:
            self._update_ema()
        terms["loss"] = total
        for name, tracker in self.trackers.items():
            tracker.update_state(terms[name])
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    def _update_ema(self) -> None:
        step = tf.cast(self.optimizer.iterations, tf.float32)
        decay = tf.minimum(1.0 - 1.0 / (step + 1.0), self.cfg.ema_decay)
        for ema_w, w in ema_pairs(self.ema, self.student):
            ema_w.assign(decay * ema_w + (1.0 - decay) * tf.cast(w, ema_w.dtype))


def ema_pairs(ema: keras.Model, student: keras.Model) -> list[tuple[tf.Variable, tf.Variable]]:
    """(mean-teacher variable, student variable) pairs, matched layer by layer and by name.

    Not ``zip(ema.weights, student.weights)``: a frozen model lists its weights in
    another order (trainable first) than a trainable one.
    """
    pairs = []
    for ema_layer, layer in zip(ema.layers, student.layers):
        if ema_layer.name != layer.name:
            raise ValueError(f"mean teacher and student differ at layer {ema_layer.name!r} vs {layer.name!r}")
        mine = {v.name.split("/")[-1]: v for v in layer.weights}
        for v in ema_layer.weights:
            pairs.append((v, mine[v.name.split("/")[-1]]))
    return pairs


class RelationalSchedule(keras.callbacks.Callback):
    """Sets the relational loss weights at the start of every epoch (and logs them)."""

    def __init__(self, trainer: RelationalDistiller):
        super().__init__()
        self.trainer = trainer
        self.current = {}

    def on_epoch_begin(self, epoch, logs=None):
        self.current = self.trainer.set_epoch(epoch)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self.current)


class Relational(Method):
    """``distill.method: relational``: CRCKD (mean teacher, CCD, CRP) and the CRD, SP and FitNet baselines.

    The teacher is the exponential moving average of the student (``teacher_mode:
    mean_teacher``, saved as ``mean_teacher.keras`` when training ends) or one trained
    model whose features are read inside the step (``fixed``; never cached logits).
    The dataset carries each image's index (memory-bank rows) and, with
    ``two_views``, a second augmentation for the teacher.
    """

    name = "relational"

    @property
    def mean_teacher(self) -> bool:
        return self.cfg.relational.teacher_mode == "mean_teacher"

    def build_teacher(self, image_size: int) -> Optional[keras.Model]:
        return None if self.mean_teacher else models.load_model(self.teacher_paths[0])  # the raw model

    def dataset_options(self) -> dict:
        return {"with_index": True, "two_views": self.cfg.relational.two_views}

    def trainer(self, student, loss_fn, train_labels, teacher):
        cfg = self.cfg
        return RelationalDistiller(student, loss_fn, train_labels, cfg.relational, cfg.data.image_size,
                                   teacher=teacher, temperature=cfg.distill.temperature, labels=cfg.data.labels,
                                   seed=cfg.seed)

    def checkpoint_state(self, trainer):
        return trainer.state(), trainer.train_variables()

    def callbacks(self, trainer) -> list:
        return [RelationalSchedule(trainer)]

    def save_outputs(self, trainer, folder: Path) -> None:
        if self.mean_teacher:  # QAT of this run distils from it (qat_plan)
            models.save_model(trainer.ema, folder / "mean_teacher.keras")

    def qat_plan(self, stage_dir: Path) -> QatPlan:
        # The run's KL term is its logit KD (student loss + kl_weight * KD): QAT keeps that balance; the
        # relation terms (CCD, CRP, ...) need the heads and memory banks, which QAT does not continue.
        alpha = 1.0 / (1.0 + self.cfg.relational.kl_weight)
        if self.mean_teacher:
            path = stage_dir / "mean_teacher.keras"
            if not path.is_file():
                raise ConfigError(f"{stage_dir}: a mean-teacher run without its teacher ({path.name}, saved by "
                                  "training since this version): retrain it to quantize it with QAT")
            return QatPlan([path], "logit KD from the run's mean teacher (EMA of the student)", alpha)
        files = teachers.run_teacher_files(self.cfg, stage_dir)
        return QatPlan(files, "logit KD from the relational run's fixed teacher "
                              f"({', '.join(f.name for f in files)})", alpha)
