"""Training callbacks: validation AUC every epoch, and resumable epoch checkpoints.

``EpochCheckpoint`` owns everything that must survive a kill: the model and
optimizer checkpoint, the best weights, the early-stopping counters and the
history. At the end of each epoch it writes, in this order, the checkpoint
(numbered by epoch), the best weights if improved, ``history.csv``, and ``state.json``
naming that checkpoint (the commit point); each file is written atomically, so a kill at
any point leaves the previous consistent state, and no completed epoch is lost.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from melanoma_tf import metrics
from melanoma_tf.backend import keras, tf
from melanoma_tf.files import write_atomic, write_json

log = logging.getLogger(__name__)

MONITOR = "val_roc_auc"


class ValidationMetrics(keras.callbacks.Callback):
    """Scores the student on the validation split after each epoch.

    Adds ``val_loss`` (the student loss), ``val_roc_auc`` and ``val_pr_auc``
    (exact, from scikit-learn, not Keras's thresholded approximation) to the logs.
    """

    def __init__(self, student: keras.Model, images: tf.data.Dataset, labels: np.ndarray,
                 student_loss: Callable, label_mode: str):
        super().__init__()
        self.student = student
        self.images = images
        self.labels = np.asarray(labels)
        self.student_loss = student_loss
        self.label_mode = label_mode

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        logits = predict_logits(self.student, self.images)
        y = self.labels.reshape(-1, 1) if self.label_mode == "binary" else self.labels
        logs["val_loss"] = float(self.student_loss(y, logits))
        for key, value in metrics.validation_summary(self.labels, logits, self.label_mode).items():
            logs[f"val_{key}"] = value


def predict_logits(model: keras.Model, images: tf.data.Dataset) -> np.ndarray:
    """Logits for a dataset of image batches, on one device.

    Not ``model.predict``: under a multi-replica strategy it splits the last,
    smaller batch across replicas, and a replica with zero images crashes
    oneDNN's depthwise convolution. Reading mirrored variables here is fine.
    """
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return np.concatenate([forward(batch).numpy() for batch in images])


class EpochCheckpoint(keras.callbacks.Callback):
    """Per-epoch resumable checkpoint, best-weights tracking, early stopping and history.csv.

    Args:
      folder: the stage's run folder.
      student: the model whose weights are "the model" (saved as best weights).
      optimizer: the optimizer whose state is checkpointed with the model.
      phase: name of the training phase (e.g. ``head``, ``finetune``).
      patience: early-stopping patience in epochs on ``val_roc_auc`` (0: off).
      extras: more trackable state saved in the same checkpoint (a relational
        distiller's memory banks, projection heads and mean teacher; a weight average).
      best_model: the model whose weights are kept as ``best.weights.h5`` (default ``student``;
        the weight average when training keeps one).
    """

    def __init__(self, folder: Path, student: keras.Model, optimizer, phase: str, patience: int = 0,
                 extras=None, best_model: Optional[keras.Model] = None):
        super().__init__()
        self.folder = Path(folder)
        self.student = student
        self.best_model = best_model if best_model is not None else student
        self.optimizer = optimizer
        self.phase = phase
        self.patience = patience
        self.state = load_state(self.folder)
        self.manager = tf.train.CheckpointManager(
            tf.train.Checkpoint(model=student, optimizer=optimizer, **({"extras": extras} if extras else {})),
            str(self.folder / "checkpoints"),
            max_to_keep=2, checkpoint_name="epoch")
        self._epoch_start = 0.0
        if self.state.get("phase") != phase:
            self.state["wait"] = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        row = {"epoch": epoch + 1, "phase": self.phase, "seconds": round(time.time() - self._epoch_start, 2),
               "lr": _current_lr(self.optimizer)}
        row.update({k: float(v) for k, v in logs.items() if np.isscalar(v) or np.size(v) == 1})
        score = row.get(MONITOR, float("nan"))
        state = self.state
        improved = np.isfinite(score) and score > state.get("best", -np.inf)
        if improved:
            state.update(best=float(score), best_epoch=epoch + 1, wait=0)
            tmp = self.folder / ".best.tmp.weights.h5"
            self.best_model.save_weights(str(tmp))
            tmp.replace(self.folder / "best.weights.h5")
        else:
            state["wait"] = state.get("wait", 0) + 1
        path = self.manager.save(checkpoint_number=epoch + 1)
        state.update(epoch=epoch + 1, phase=self.phase, checkpoint=Path(path).name)
        state.setdefault("history", []).append(row)
        # history.csv is derived from state.json, which is written last: whoever sees a new state.json
        # (a resume, a watcher) also sees the history up to that epoch.
        write_atomic(self.folder / "history.csv", history_csv(state["history"]))
        write_json(self.folder / "state.json", state)
        if self.patience and state["wait"] >= self.patience:
            log.info("early stopping: %s has not improved for %d epochs (best %.4f at epoch %d)",
                     MONITOR, state["wait"], state["best"], state["best_epoch"])
            self.model.stop_training = True
            state["stopped_phase"] = self.phase
            write_json(self.folder / "state.json", state)


class WeightAverage(keras.callbacks.Callback):
    """An exponential moving average of the student's weights, updated after every training step.

    ``average`` is a copy of the student holding the averaged weights (BatchNorm statistics
    included); the decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` steps, so
    the first steps do not keep the start weights for long. Checkpointed with :meth:`trackable`.
    """

    def __init__(self, student: keras.Model, decay: float):
        super().__init__()
        self.average = keras.models.clone_model(student)
        self.average.set_weights(student.get_weights())
        self.average.trainable = False
        self.average._name = f"{student.name}_average"
        self.pairs = [(a, w) for layer in student.layers
                      for a, w in zip(self.average.get_layer(layer.name).weights, layer.weights)]
        self.decay = float(decay)
        self.steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="average_steps")

    def trackable(self) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(model=self.average, steps=self.steps)

    @tf.function
    def _update(self):
        n = tf.cast(self.steps, tf.float32)
        decay = tf.minimum(self.decay, (1.0 + n) / (10.0 + n))
        for average, weight in self.pairs:
            average.assign(decay * average + (1.0 - decay) * tf.cast(weight, average.dtype))
        self.steps.assign_add(1)

    def on_train_batch_end(self, batch, logs=None):
        self._update()


def history_csv(rows: list[dict]) -> str:
    """History as CSV with a stable column order (epoch, phase, seconds, lr, then the logged values)."""
    table = pd.DataFrame(rows)
    first = [c for c in ("epoch", "phase", "seconds", "lr") if c in table.columns]
    return table[first + sorted(c for c in table.columns if c not in first)].to_csv(index=False)


def load_state(folder: Path) -> dict:
    """The stage's resumable state (empty for a fresh stage)."""
    path = Path(folder) / "state.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def restore_checkpoint(folder: Path, state: dict, student: keras.Model, optimizer=None, extras=None,
                       variables=None) -> bool:
    """Restores the checkpoint named in state into student (and optimizer and extras when given).

    ``variables`` are the optimizer's variables (default: the student's trainable ones).
    """
    name = state.get("checkpoint")
    if not name:
        return False
    prefix = str(Path(folder) / "checkpoints" / name)
    if not tf.io.gfile.exists(prefix + ".index"):
        raise FileNotFoundError(f"state.json names checkpoint {prefix} but it is missing; cannot resume")
    objects = {"model": student}
    if optimizer is not None:
        optimizer.build(student.trainable_variables if variables is None else variables)
        objects["optimizer"] = optimizer
    if extras is not None:
        objects["extras"] = extras
    tf.train.Checkpoint(**objects).restore(prefix).expect_partial()
    return True


def _current_lr(optimizer) -> Optional[float]:
    try:  # tf_keras resolves a schedule to the current value here
        return float(np.asarray(optimizer.learning_rate))
    except (TypeError, ValueError):
        return None
