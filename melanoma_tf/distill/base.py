"""The contract every training method follows, and the plain one: supervised training without a teacher.

A method is chosen by the stage and ``distill.method`` (:func:`melanoma_tf.distill.method_for`)
and owns everything that differs between variants, so the training loop
(:func:`melanoma_tf.fit.fit_student`) and the commands never branch on a method name:

- its teacher: none, a loaded model (online), cached logits, or the EMA of the student;
- what the training dataset carries besides images and labels (cached logits, image indices, a second view);
- the Keras model that trains the student (its ``compute_loss`` / ``train_step``);
- the callbacks and the extra state checkpointed with the student (memory banks, heads, EMA);
- what it writes beside the student when training ends;
- what quantization-aware training continues with (:meth:`Method.qat_plan`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from melanoma_tf.backend import keras
from melanoma_tf.config import Config
from melanoma_tf.data import PreparedData


@dataclass(frozen=True)
class QatPlan:
    """What QAT of a trained run distils from: teacher files (none: plain fine-tuning), why, and alpha."""

    teacher_files: Optional[list[Path]]
    description: str
    alpha: float = 1.0


class Method:
    """A way of training the student. Subclasses implement :meth:`trainer` and override what differs;
    every other hook does nothing by default (supervised training).

    Args:
      cfg: the run's config.
      teacher_paths: the teacher ``.keras`` file(s) a distilling method learns from.
    """

    name = ""

    def __init__(self, cfg: Config, teacher_paths: Optional[list[Path]] = None):
        self.cfg = cfg
        self.teacher_paths = list(teacher_paths or [])

    # -- training
    def build_teacher(self, image_size: int) -> Optional[keras.Model]:
        """The teacher model the trainer runs every step (built inside the distribution scope), or None."""
        return None

    def prepare(self, data: PreparedData, folder: Path) -> None:
        """Work before the datasets are built (e.g. caching the teacher's logits into ``folder``)."""

    def dataset_options(self) -> dict:
        """Extra keyword arguments of :func:`melanoma_tf.pipeline.make_dataset` for the training split."""
        return {}

    def trainer(self, student: keras.Model, loss_fn: Callable, train_labels: np.ndarray,
                teacher: Optional[keras.Model]) -> keras.Model:
        """The Keras model whose ``fit`` trains ``student`` (never saved; ``student`` is)."""
        raise NotImplementedError

    def checkpoint_state(self, trainer: keras.Model) -> tuple[Optional[object], Optional[list]]:
        """Trackable state saved with the student (or None), and the variables the optimizer updates."""
        return None, None

    def callbacks(self, trainer: keras.Model) -> list:
        """Callbacks run before validation at each epoch (e.g. loss-weight schedules)."""
        return []

    def save_outputs(self, trainer: keras.Model, folder: Path) -> None:
        """Files written beside ``model.keras`` when training ends."""

    def summary(self) -> dict:
        """What the stage's ``metrics.json`` records about the method (e.g. its teacher's validation scores)."""
        return {}

    # -- quantization-aware training of the trained student
    def qat_plan(self, stage_dir: Path) -> QatPlan:
        return QatPlan(None, "plain fine-tuning with the run's loss")
