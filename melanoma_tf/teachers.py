"""Teachers for distillation: find them, load one or an ensemble, cache their logits (offline KD)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from melanoma_tf.config import Config, ConfigError

if TYPE_CHECKING:
    from melanoma_tf.train import PreparedData

log = logging.getLogger("melanoma_tf.train")


def resolve_teacher_paths(paths: tuple[str, ...]) -> list[Path]:
    return [resolve_teacher_path(p) for p in paths]


def resolve_teacher_path(path: str) -> Path:
    """A teacher ``.keras`` file, or a run folder holding ``model.keras`` or ``teacher/model.keras``."""
    p = Path(path).expanduser()
    for candidate in (p, p / "model.keras", p / "teacher" / "model.keras"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"distill.teacher: no teacher model at {p} (expected a .keras file or a run folder)")


def _fit_teacher_to_size(teacher, image_size: int):
    """Wraps a teacher built for another input size with a resize, so it can share the student's batch."""
    from melanoma_tf.backend import keras

    size = teacher.input_shape[1]
    if size == image_size:
        return teacher
    log.info("teacher %s input is %dpx, data is %dpx: resizing inside the teacher", teacher.name, size, image_size)
    image = keras.Input((image_size, image_size, 3), name="image")
    resized = keras.layers.Resizing(size, size, name="teacher_resize")(image)
    return keras.Model(image, teacher(resized, training=False), name=f"{teacher.name}_resized")


def load_teacher(paths: list[Path], image_size: int):
    """The frozen teacher for ``image_size`` inputs: one model, or the logit average of several (an ensemble).

    Each member may have its own input size (it is resized inside); all must have
    the same number of outputs.
    """
    from melanoma_tf import models
    from melanoma_tf.backend import keras

    members = []
    for i, path in enumerate(paths):
        member = models.load_model(path)
        member._name = f"teacher_{i}_{member.name}"  # unique layer names inside the ensemble
        members.append(_fit_teacher_to_size(member, image_size))
    if len(members) == 1:
        return members[0]
    widths = {m.output_shape[-1] for m in members}
    if len(widths) != 1:
        raise ConfigError(f"distill.teacher: the ensemble members have different output sizes {sorted(widths)} "
                          f"({[str(p) for p in paths]})")
    image = keras.Input((image_size, image_size, 3), name="image")
    logits = keras.layers.Average(name="ensemble_mean")([m(image, training=False) for m in members])
    log.info("teacher: an ensemble of %d models (mean logits)", len(members))
    return keras.Model(image, logits, name="teacher_ensemble")


def cache_teacher_logits(teacher, data: PreparedData, cfg: Config, folder: Path) -> np.ndarray:
    """Teacher logits for every training image, without augmentation (offline KD).

    Stored as ``teacher_logits.npz`` (image_id, logits) in the stage folder and
    reused on resume when the image ids match.
    """
    from melanoma_tf.pipeline import make_dataset

    train = data.part("train")
    path = folder / "teacher_logits.npz"
    if path.is_file():
        saved = np.load(path, allow_pickle=False)
        if list(saved["image_id"]) == train["image_id"].tolist():
            return saved["logits"]
    ds = make_dataset(train["path"].tolist(), train["label"].to_numpy(), cfg.data.image_size,
                      cfg.train.batch_size, binary=cfg.data.labels == "binary", cache="none")
    start = time.time()
    from melanoma_tf.callbacks import predict_logits

    logits = predict_logits(teacher, ds.map(lambda x, y, w: x))
    log.info("cached teacher logits for %d training images in %.1fs", len(train), time.time() - start)
    tmp = folder / ".teacher_logits.tmp.npz"
    np.savez(tmp, image_id=np.array(train["image_id"].tolist()), logits=logits)
    tmp.replace(path)
    return logits
