"""Training methods: one class per way of training the student, chosen by the stage and ``distill.method``.

``METHODS`` maps ``distill.method`` (plus ``none``, supervised training) to its class; each
implements :class:`melanoma_tf.distill.base.Method`. Adding a method is one class and one line here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from melanoma_tf.config import Config
from melanoma_tf.distill.base import Method, QatPlan
from melanoma_tf.distill.kd import LogitKD, Supervised
from melanoma_tf.distill.relational import Relational

METHODS: dict[str, type[Method]] = {"none": Supervised, "kd": LogitKD, "relational": Relational}


def method_for(stage: str, cfg: Config, teacher_paths: Optional[list[Path]] = None) -> Method:
    """The method that trains ``stage``: supervised for ``teacher`` / ``student``, ``distill.method`` for ``distill``."""
    return METHODS[cfg.distill.method if stage == "distill" else "none"](cfg, teacher_paths)


__all__ = ["METHODS", "Method", "QatPlan", "method_for"]
