"""Teachers for distillation: find them, load one or an ensemble, cache their logits (offline KD)."""

from __future__ import annotations

import hashlib
import json
import os
import logging
import time
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from melanoma_tf import metrics, models
from melanoma_tf.backend import keras, tf
from melanoma_tf.callbacks import predict_logits
from melanoma_tf.config import Config, ConfigError
from melanoma_tf.data import PreparedData
from melanoma_tf.pipeline import DECODING, make_dataset

log = logging.getLogger("melanoma_tf.train")


def resolve_teacher_paths(paths: tuple[str, ...]) -> list[Path]:
    """Each entry's teacher file; an entry with ``*``, ``?`` or ``[`` names every matching run folder or
    ``.keras`` file (sorted): an ensemble.

    Raises:
      ConfigError: a pattern matches nothing, or an entry holds no teacher model.
    """
    found = []
    for entry in paths:
        if not any(c in entry for c in "*?["):
            found.append(resolve_teacher_path(entry))
            continue
        # folders (runs) and .keras files; a run's log or config beside them is not a teacher
        matches = sorted(str(m) for m in Path("/").glob(str(Path(entry).expanduser().absolute())[1:])
                         if m.is_dir() or m.suffix == ".keras")
        if not matches:
            raise ConfigError(f"distill.teacher: {entry} matches no run folder or .keras file")
        found.extend(resolve_teacher_path(m) for m in matches)
    return found


def resolve_teacher_path(path: str) -> Path:
    """A teacher ``.keras`` file, or a run folder holding ``model.keras`` or ``teacher/model.keras``."""
    p = Path(path).expanduser()
    for candidate in (p, p / "model.keras", p / "teacher" / "model.keras"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"distill.teacher: no teacher model at {p} (expected a .keras file or a run folder)")


def resized_input(model: keras.Model, image_size: int, layer_name: str, training: Optional[bool] = None):
    """``model`` taking ``image_size`` inputs: resized inside to the side it was built for (itself if equal).

    A 224 px teacher shares the student's 160 px batches this way (its ensemble, its
    feature model for relational distillation).
    """
    size = model.input_shape[1]
    if size == image_size:
        return model
    image = keras.Input((image_size, image_size, 3), name="image")
    resized = keras.layers.Resizing(size, size, name=layer_name)(image)
    return keras.Model(image, model(resized, training=training), name=f"{model.name}_resized")


def run_teacher_files(cfg: Config, stage_dir: Path) -> list[Path]:
    """The teacher file(s) a distilling stage learns from: ``distill.teacher``, else its chained run's teacher stage.

    Raises:
      ConfigError: a file is missing (naming it and the stage folder).
    """
    files = (resolve_teacher_paths(cfg.distill.teacher) if cfg.distill.teacher
             else [Path(stage_dir).parent / "teacher" / "model.keras"])
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise ConfigError(f"{stage_dir}: the run's teacher is missing ({', '.join(missing)})")
    return [Path(f) for f in files]


def _fit_teacher_to_size(teacher, image_size: int):
    if teacher.input_shape[1] != image_size:
        log.info("teacher %s input is %dpx, data is %dpx: resizing inside the teacher", teacher.name,
                 teacher.input_shape[1], image_size)
    return resized_input(teacher, image_size, "teacher_resize", training=False)


def load_teacher(paths: list[Path], image_size: int):
    """The frozen teacher for ``image_size`` inputs: one model, or the logit average of several (an ensemble).

    Each member may have its own input size (it is resized inside); all must have
    the same number of outputs.
    """
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


def teacher_input_size(paths: list[Path]) -> int:
    """The largest input side among the teacher models: cached logits are computed at that resolution."""
    sizes = []
    for path in paths:
        try:
            with zipfile.ZipFile(path) as archive:
                config = json.loads(archive.read("config.json"))
            shape = config["config"]["layers"][0]["config"]["batch_input_shape"]
            sizes.append(int(shape[1]))
        except (KeyError, IndexError, TypeError, ValueError, zipfile.BadZipFile):
            sizes.append(int(models.load_model(path).input_shape[1]))
    return max(sizes)


# The four flips of test-time augmentation (a lesion has no up, down, left or right).
_TTA_FLIPS = ((False, False), (True, False), (False, True), (True, True))


def shared_cache_file(cfg: Config, paths: list[Path], image_size: int) -> Optional[Path]:
    """Where ``distill.teacher_cache`` keeps these teachers' logits at ``image_size`` (None: no shared cache).

    The name hashes each teacher file's absolute path, size and modification time, the resolution and
    TTA: a teacher trained again at the same path gets a new file.
    """
    if not cfg.distill.teacher_cache:
        return None
    key = [[str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns] for p in paths]
    text = json.dumps([key, int(image_size), bool(cfg.distill.teacher_tta)])
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return Path(cfg.distill.teacher_cache).expanduser() / f"teacher_logits_{digest}.npz"


def _saved_logits(path: Optional[Path], image_ids: list[str]) -> Optional[np.ndarray]:
    """The logits in ``path`` if it covers exactly ``image_ids``, decoded as this release decodes; else None."""
    if path is None or not path.is_file():
        return None
    try:
        saved = np.load(path, allow_pickle=False)
        matches = (list(saved["image_id"]) == image_ids and "decoding" in saved.files
                   and str(saved["decoding"]) == DECODING)
        return saved["logits"] if matches else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:  # a damaged cache is computed again
        log.warning("%s: unreadable cached teacher logits (%s); computing them again", path, err)
        return None


def _save_logits(path: Path, image_ids: list[str], logits: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{os.getpid()}.tmp.npz"
    np.savez(tmp, image_id=np.array(image_ids), logits=logits, decoding=np.array(DECODING))
    tmp.replace(path)


def cache_teacher_logits(teacher, data: PreparedData, cfg: Config, folder: Path, image_size: Optional[int] = None,
                         tta: bool = False, shared: Optional[Path] = None) -> np.ndarray:
    """Teacher logits for every training image, without augmentation (offline KD).

    Stored as ``teacher_logits.npz`` (image_id, logits) in the stage folder and
    reused on resume when the image ids match.

    Args:
      teacher: the teacher model, taking ``image_size`` inputs.
      image_size: the resolution the teacher sees (default ``data.image_size``):
        a 224 px teacher should see 224 px images, not the student's upsampled ones.
      tta: average the logits over the four flips of each image.
      shared: a file of :func:`shared_cache_file`, read when it covers the same training images
        (the runs of a sweep or grid share one teacher), written after computing.
    """
    train = data.part("train")
    ids = train["image_id"].tolist()
    path = folder / "teacher_logits.npz"
    # Logits of pixels decoded another way (an older release) are computed again.
    for source in (path, shared):
        logits = _saved_logits(source, ids)
        if logits is not None:
            if source != path:
                log.info("teacher logits for %d training images taken from %s", len(ids), source)
                _save_logits(path, ids, logits)
            return logits
    start = time.time()
    logits = _logits(teacher, train, cfg, image_size or cfg.data.image_size, tta)
    log.info("cached teacher logits for %d training images at %d px%s in %.1fs", len(train),
             image_size or cfg.data.image_size, " (4-flip TTA)" if tta else "", time.time() - start)
    _save_logits(path, ids, logits)
    if shared is not None:
        _save_logits(shared, ids, logits)
    return logits


def _logits(teacher, frame, cfg: Config, image_size: int, tta: bool) -> np.ndarray:
    """The teacher's logits for the images of ``frame`` (unaugmented; the mean over four flips with ``tta``)."""
    ds = make_dataset(frame["path"].tolist(), frame["label"].to_numpy(), image_size, cfg.train.batch_size,
                      binary=cfg.data.labels == "binary", cache="none")
    images = ds.map(lambda x, y, w: x)
    views = []
    for flip_h, flip_v in (_TTA_FLIPS if tta else _TTA_FLIPS[:1]):
        axes = [axis for axis, on in ((2, flip_h), (1, flip_v)) if on]
        views.append(predict_logits(teacher, images.map(lambda x, a=tuple(axes): tf.reverse(x, a) if a else x)))
    return np.mean(views, axis=0)


def teacher_resolution(paths: list[Path], cfg: Config) -> int:
    """The side of the images the teacher(s) ``paths`` see: the largest teacher input, at least ``data.image_size``."""
    return max(cfg.data.image_size, teacher_input_size(paths))


def teacher_validation(teacher, image_size: int, data: PreparedData, cfg: Config) -> dict:
    """How ``teacher`` (one model or the ensemble, with TTA when configured) scores on the validation split.

    Distillation is worth it only if this beats the student alone: every distilled stage records it
    (``teacher_val_roc_auc`` ... in its ``metrics.json``), at the teacher's own resolution ``image_size``.
    """
    val = data.part("val")
    logits = _logits(teacher, val, cfg, image_size, cfg.distill.teacher_tta)
    scores = metrics.validation_summary(val["label"].to_numpy(), logits, cfg.data.labels)
    log.info("teacher on validation (%d images, %d px%s): ROC-AUC %.4f", len(val), image_size,
             ", 4-flip TTA" if cfg.distill.teacher_tta else "", scores["roc_auc"])
    return {f"teacher_val_{k}": v for k, v in scores.items()}


def teacher_logits(paths: list[Path], data: PreparedData, cfg: Config, folder: Path,
                   reuse_from: Optional[Path] = None) -> np.ndarray:
    """Cached logits of the teacher(s) ``paths`` for the training split, at the largest teacher's resolution.

    ``reuse_from``: a folder whose ``teacher_logits.npz`` is taken when it covers the same
    training images (QAT reuses the distilled run's). Otherwise they are computed into ``folder``.
    """
    if reuse_from is not None and (reuse_from / "teacher_logits.npz").is_file():
        saved = np.load(reuse_from / "teacher_logits.npz", allow_pickle=False)
        if list(saved["image_id"]) == data.part("train")["image_id"].tolist():
            return saved["logits"]
    size = teacher_resolution(paths, cfg)
    return cache_teacher_logits(load_teacher(paths, size), data, cfg, folder, size, cfg.distill.teacher_tta,
                                shared_cache_file(cfg, paths, size))
