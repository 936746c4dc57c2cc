"""The one training loop: phases of epochs, per-epoch checkpoints, resume, validation, best weights.

Every stage (:func:`melanoma_tf.train.train_stage`) and quantization-aware training
(:func:`melanoma_tf.quantize.qat_finetune`) run through :func:`fit_student`; what
differs between training methods comes in as the trainer and its callbacks
(:mod:`melanoma_tf.distill`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from melanoma_tf import callbacks as cb
from melanoma_tf import models
from melanoma_tf.backend import keras, tf
from melanoma_tf.config import Config
from melanoma_tf.data import PreparedData
from melanoma_tf.pipeline import build_augmenter, make_dataset

log = logging.getLogger("melanoma_tf.train")

STALE_FILES = ("state.json", "history.csv", "best.weights.h5")


@dataclass(frozen=True)
class Phase:
    """Epochs trained with one optimizer: ``head`` (frozen backbone), ``finetune``, ``train`` or ``qat``.

    ``backbone_lr_scale``: the learning rate of every layer but the head, relative to ``lr``.
    """

    name: str
    epochs: int
    lr: float
    backbone_lr_scale: float = 1.0


def phases_for(stage: str, cfg: Config) -> list[Phase]:
    """A stage's phases, run one after the other: a frozen teacher trains its head, then fine-tunes."""
    if stage != "teacher":
        return [Phase("train", cfg.train.epochs, cfg.train.lr, cfg.train.backbone_lr_scale)]
    t = cfg.teacher
    scale = cfg.train.backbone_lr_scale if t.backbone_lr_scale is None else t.backbone_lr_scale
    phases = [Phase("head" if t.mode == "frozen" else "train", cfg.train.epochs if t.epochs is None else t.epochs,
                    cfg.train.lr if t.lr is None else t.lr, scale)]
    if t.mode == "frozen" and t.finetune_epochs and t.finetune_blocks:
        phases.append(Phase("finetune", t.finetune_epochs, t.finetune_lr, scale))
    return [p for p in phases if p.epochs > 0]


class _ScaledSteps:
    """Optimizer mixin: the step of chosen variables is ``scale`` times the optimizer's own.

    Scaling the step, not the gradient: Adam's step does not change when its gradient is scaled.
    The moment estimates are updated as usual, so this is Adam with a lower learning rate for
    those variables.
    """

    def scale_steps(self, variables: list, scale: float):
        self._step_scales = {self._var_key(v): float(scale) for v in variables}
        return self

    def update_step(self, gradient, variable):
        scale = getattr(self, "_step_scales", {}).get(self._var_key(variable), 1.0)
        if scale == 1.0:
            return super().update_step(gradient, variable)
        before = tf.identity(variable)
        super().update_step(gradient, variable)
        variable.assign(before + scale * (variable - before))


class ScaledAdam(_ScaledSteps, keras.optimizers.Adam):
    pass


class ScaledAdamW(_ScaledSteps, keras.optimizers.AdamW):
    pass


def scheduled_optimizer(cfg: Config, phase: Phase, steps_per_epoch: int, student: Optional[keras.Model] = None):
    """Adam (AdamW with ``train.weight_decay``) with the configured schedule over the phase.

    With ``phase.backbone_lr_scale`` != 1 (``train.backbone_lr_scale``, or ``teacher.backbone_lr_scale`` for a
    teacher; the student given), every variable but the head's steps at that fraction of the learning rate
    (:func:`melanoma_tf.models.backbone_variables`).
    """
    t = cfg.train
    if t.lr_schedule == "cosine":
        total = max(1, phase.epochs * steps_per_epoch)
        warmup = t.warmup_epochs * steps_per_epoch
        rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else phase.lr, decay_steps=max(1, total - warmup),
            alpha=0.01, warmup_target=phase.lr if warmup else None, warmup_steps=warmup)
    else:
        rate = phase.lr
    if t.weight_decay:
        optimizer = ScaledAdamW(learning_rate=rate, weight_decay=t.weight_decay)
    else:
        optimizer = ScaledAdam(learning_rate=rate)
    # A frozen backbone (a teacher's head phase) has no trainable variable to scale, and says nothing.
    backbone = models.backbone_variables(student) if student is not None and phase.backbone_lr_scale != 1.0 else []
    if backbone:
        optimizer.scale_steps(backbone, phase.backbone_lr_scale)
        log.info("phase %s: the backbone learns at %gx the learning rate", phase.name, phase.backbone_lr_scale)
    return optimizer


def training_datasets(cfg: Config, data: PreparedData, sample_weights: Optional[np.ndarray], options: dict):
    """The (augmented) training batches, their steps per epoch, and the validation images."""
    train, val = data.part("train"), data.part("val")
    size, batch, binary = cfg.data.image_size, cfg.train.batch_size, cfg.data.labels == "binary"
    augmenter = build_augmenter(cfg.data.augment, cfg.seed, size)
    train_ds = make_dataset(train["path"].tolist(), train["label"].to_numpy(), size, batch, binary=binary,
                            training=True, sample_weights=sample_weights, augmenter=augmenter, cache=cfg.data.cache,
                            seed=cfg.seed, **options)
    steps = math.ceil(len(train) / batch)
    if cfg.train.steps_per_epoch:
        steps = min(steps, cfg.train.steps_per_epoch)
        train_ds = train_ds.take(steps)
    val_ds = make_dataset(val["path"].tolist(), val["label"].to_numpy(), size, batch, binary=binary,
                          cache=cfg.data.cache)
    return train_ds, steps, val_ds.map(lambda x, y, w: x)


@dataclass
class Loop:
    """What :func:`fit_student` needs besides the model.

    Attributes:
      train_ds: the training batches (``fit`` input).
      val_images: validation images, batched; ``val_labels`` their classes.
      loss_fn: the student loss (validation loss is reported with it).
      labels: ``binary`` or ``multiclass``.
      make_trainer: ``student -> Keras model whose fit trains it``; called once per phase.
      optimizer_for: ``phase -> optimizer``.
      checkpoint_state: ``trainer -> (extra trackable state, optimizer variables)``.
      method_callbacks: ``trainer -> callbacks`` run before validation each epoch.
      schedule_callbacks: ``phase -> callbacks`` run after validation (e.g. reduce-on-plateau).
      before_phase: ``(student, phase) -> None`` run before a phase starts (e.g. unfreezing blocks).
      patience: early-stopping patience on validation ROC-AUC (0: off).
      ema_decay: >0: validate, keep and end with an exponential moving average of the weights.
      tensorboard: write TensorBoard logs to ``folder/tensorboard``.
      verbose: Keras progress output.
      strategy: the distribution strategy the trainer and optimizer are created in.
      name: what the log lines call this training.
    """

    train_ds: tf.data.Dataset
    val_images: tf.data.Dataset
    val_labels: np.ndarray
    loss_fn: Callable
    labels: str
    make_trainer: Callable
    optimizer_for: Callable
    checkpoint_state: Callable = lambda trainer: (None, None)
    method_callbacks: Callable = lambda trainer: []
    schedule_callbacks: Callable = lambda phase: []
    before_phase: Optional[Callable] = None
    patience: int = 0
    ema_decay: float = 0.0
    tensorboard: bool = False
    verbose: int = 1
    strategy: Optional[tf.distribute.Strategy] = None
    name: str = "training"  # what the log calls it ("stage student", "QAT")


def fit_student(student: keras.Model, loop: Loop, folder: Path, phases: list[Phase], resume: bool = True):
    """Trains ``student`` through ``phases`` in ``folder``, resumably; returns the last trainer (None if done).

    ``folder/state.json`` says where a killed run was: finished phases are skipped, a
    phase stopped early stays stopped, mid-phase the model, optimizer and method state
    are restored, at a phase boundary the model only. Ends with the best epoch's weights
    (validation ROC-AUC) in ``student``.
    """
    state = cb.load_state(folder) if resume else {}
    if not resume:
        for stale in STALE_FILES:
            (folder / stale).unlink(missing_ok=True)
    start_epoch = int(state.get("epoch", 0))
    if start_epoch:
        log.info("resuming %s from epoch %d (phase %s)", loop.name, start_epoch, state.get("phase"))
    strategy = loop.strategy or tf.distribute.get_strategy()
    phase_start, trainer = 0, None
    for phase in phases:
        phase_end = phase_start + phase.epochs
        if start_epoch >= phase_end or state.get("stopped_phase") == phase.name:
            phase_start = phase_end
            continue
        if loop.before_phase is not None:
            loop.before_phase(student, phase)
        with strategy.scope():
            optimizer = loop.optimizer_for(phase)
            trainer = loop.make_trainer(student)
            extras, variables = loop.checkpoint_state(trainer)
            average = cb.WeightAverage(student, loop.ema_decay) if loop.ema_decay else None
            if average is not None:  # a method's state keeps its place in the checkpoint when there is no average
                extras = (average.trackable() if extras is None
                          else tf.train.Checkpoint(method=extras, average=average.trackable()))
            trainer.compile(optimizer=optimizer)
            if start_epoch > phase_start:  # mid-phase: model, optimizer and method state
                cb.restore_checkpoint(folder, state, student, optimizer, extras, variables)
            elif start_epoch:  # at a phase boundary: the model only, fresh optimizer
                cb.restore_checkpoint(folder, state, student)
            if average is not None and not start_epoch > phase_start:  # a new phase averages from its start
                average.average.set_weights(student.get_weights())
        scored = average.average if average is not None else student  # what is validated and kept as best
        checkpoint = cb.EpochCheckpoint(folder, student, optimizer, phase.name, loop.patience, extras=extras,
                                        best_model=scored)
        callbacks = [*loop.method_callbacks(trainer), *([average] if average is not None else []),
                     cb.ValidationMetrics(scored, loop.val_images, loop.val_labels, loop.loss_fn, loop.labels),
                     *loop.schedule_callbacks(phase), checkpoint]
        if loop.tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(str(folder / "tensorboard"), write_graph=False,
                                                         profile_batch=0))
        trainer.fit(loop.train_ds, epochs=phase_end, initial_epoch=max(start_epoch, phase_start),
                    callbacks=callbacks, verbose=loop.verbose)
        state = checkpoint.state
        start_epoch = int(state.get("epoch", start_epoch))
        phase_start = phase_end
    if (folder / "best.weights.h5").is_file():
        student.load_weights(str(folder / "best.weights.h5"))
    return trainer


def unfreeze_for_finetuning(cfg: Config, folder: Path) -> Callable:
    """``before_phase`` of a frozen teacher: the fine-tune phase starts from the best head, top blocks trainable."""
    def before(student: keras.Model, phase: Phase) -> None:
        if phase.name != "finetune":
            return
        if (folder / "best.weights.h5").is_file():  # fine-tune from the best head, not the last
            student.load_weights(str(folder / "best.weights.h5"))
        for layer in student.layers:
            layer.trainable = False
        unfrozen = models.unfreeze_top_blocks(student, cfg.teacher.finetune_blocks, cfg.teacher.arch)
        for name in ("avg_pool", "head_dropout", "logits"):
            student.get_layer(name).trainable = True
        log.info("fine-tuning the top %d blocks: %s", len(unfrozen), ", ".join(unfrozen))

    return before
