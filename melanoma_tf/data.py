"""HAM10000 metadata, image discovery, labels and lesion-grouped splits.

Everything here is TensorFlow-free except :func:`find_unreadable_images`, which
decodes every image once with the same TensorFlow decoder the input pipeline
uses, so that a corrupt JPEG is found before training and never mid-epoch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from melanoma_tf.backend import tf
from melanoma_tf.errors import MelanomaTfError
from melanoma_tf.files import write_atomic, write_json
from melanoma_tf.pipeline import DECODING, decode_rgb

log = logging.getLogger(__name__)

# HAM10000's seven diagnoses, in the order used for multiclass labels.
DX_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
MELANOMA = "mel"
REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "val", "holdout")
# Holdout and validation fractions are realised as a number of folds out of this
# many stratified-grouped folds, so any fraction is honoured to within 5 points.
_SPLIT_RESOLUTION = 20


class DataError(MelanomaTfError, ValueError):
    """The metadata or the image folders are not usable; the message names the file/row."""


@dataclass
class LesionData:
    """Images that exist and decode, with labels.

    Attributes:
      frame: one row per usable image: image_id, lesion_id, dx, label, path, and
        the other metadata columns; sorted by image_id.
      label_names: names of the label values (``["not_melanoma", "melanoma"]`` or the dx codes).
      n_listed: rows in the metadata CSV.
      missing: image_ids listed in the metadata with no file on disk.
      unreadable: image_ids whose file exists but does not decode.
      metadata_path: the CSV read.
    """

    frame: pd.DataFrame
    label_names: list[str]
    n_listed: int
    missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    metadata_path: str = ""

    def summary(self) -> dict:
        labels = self.frame["label"].to_numpy()
        return {
            "metadata": self.metadata_path,
            "n_listed": int(self.n_listed),
            "n_images": int(len(self.frame)),
            "n_missing": len(self.missing),
            "n_unreadable": len(self.unreadable),
            "missing_first": self.missing[:20],
            "unreadable": self.unreadable[:100],
            "label_names": self.label_names,
            "label_counts": {name: int((labels == i).sum()) for i, name in enumerate(self.label_names)},
        }


def read_csv_table(csv_path: str | os.PathLike, **kwargs) -> pd.DataFrame:
    """A user's CSV as a DataFrame, whatever spreadsheet wrote it; a file that is not a table is a DataError.

    UTF-8 (with or without a byte-order mark) and UTF-16 with a byte-order mark (Excel's "Unicode text") are
    decoded; anything else as Latin-1, which never fails (image ids are ASCII). The separator is the one of
    comma, semicolon and tab that the header line uses most (a semicolon is Excel's in many locales).
    """
    csv_path = Path(csv_path)
    raw = csv_path.read_bytes()
    encodings = ("utf-16",) if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else ("utf-8-sig", "latin-1")
    for encoding in encodings:  # Latin-1 decodes any bytes: the loop always ends with text or utf-16's error
        try:
            text = raw.decode(encoding)
            break
        except UnicodeDecodeError as err:
            if encoding == encodings[-1]:
                raise DataError(f"{csv_path}: not readable as {encoding} text: {err}") from None
    header = text.split("\n", 1)[0]
    separator = max([",", ";", "\t"], key=header.count)
    try:
        return pd.read_csv(io.StringIO(text), sep=separator, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        raise DataError(f"{csv_path}: cannot parse as CSV: {err}") from None


def read_metadata(csv_path: str | os.PathLike) -> pd.DataFrame:
    """Reads and checks a HAM10000-style metadata CSV.

    Args:
      csv_path: the CSV (``lesion_id,image_id,dx,...``); ``image_id`` may end in ``.jpg``.

    Returns:
      The metadata with ``image_id`` stripped of any image suffix.

    Raises:
      DataError: a missing file or column, an empty id, a duplicate image_id or an
        unknown dx value; the message names the file and the CSV row (1 = header).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"metadata file not found: {csv_path}")
    frame = read_csv_table(csv_path, dtype=str, keep_default_na=False)
    frame.columns = [c.strip() for c in frame.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {missing}; found {list(frame.columns)}")
    for column in REQUIRED_COLUMNS:
        frame[column] = frame[column].str.strip()
        empty = np.flatnonzero(frame[column].to_numpy() == "")
        if len(empty):
            raise DataError(f"{csv_path}: row {empty[0] + 2}: empty {column}")
    frame["image_id"] = frame["image_id"].map(_strip_suffix)
    frame["dx"] = frame["dx"].str.lower()
    unknown = ~frame["dx"].isin(DX_CLASSES)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise DataError(f"{csv_path}: row {row + 2}: unknown dx value {frame['dx'].iloc[row]!r}; "
                        f"expected one of {list(DX_CLASSES)}")
    duplicated = frame["image_id"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise DataError(f"{csv_path}: row {row + 2}: duplicate image_id {frame['image_id'].iloc[row]!r}")
    return frame


def _strip_suffix(image_id: str) -> str:
    lower = image_id.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return image_id[: -len(suffix)]
    return image_id


def find_images(root: str | os.PathLike, image_dirs: tuple[str, ...] | list[str] = ()) -> dict[str, Path]:
    """Maps image_id -> file for every image under the given folders.

    Args:
      root: the dataset folder (holding the metadata CSV).
      image_dirs: folders relative to root (or absolute). Empty: search all of
        root, which covers both one ``images/`` folder and Kaggle's
        ``HAM10000_images_part_1`` + ``HAM10000_images_part_2``.

    Raises:
      DataError: a named folder does not exist, or two files claim one image_id.
    """
    root = Path(root)
    folders = [Path(d) if Path(d).is_absolute() else root / d for d in image_dirs] or [root]
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            raise DataError(f"image folder not found: {folder} (data.image_dirs)")
        for dirpath, _, filenames in os.walk(folder):
            for name in filenames:
                if not name.lower().endswith(IMAGE_SUFFIXES) or name.startswith("."):
                    continue
                image_id = _strip_suffix(name)
                path = Path(dirpath) / name
                if image_id in found and found[image_id] != path:
                    raise DataError(f"image {image_id!r} found twice: {found[image_id]} and {path}")
                found[image_id] = path
    return found


def find_unreadable_images(paths: list[str]) -> list[int]:
    """Indices of files that TensorFlow's image decoder rejects.

    Uses the decoder of the training pipeline, in parallel, so that whatever
    passes here also decodes during training.
    """
    if not paths:
        return []
    indices = tf.data.Dataset.range(len(paths))
    files = tf.data.Dataset.from_tensor_slices(tf.constant(paths, dtype=tf.string))

    def _decode(index, path):
        image = decode_rgb(tf.io.read_file(path))
        # Touch the pixels so that truncated data fails here too.
        return index, tf.reduce_min(tf.shape(image))

    readable = (tf.data.Dataset.zip((indices, files))
                .map(_decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
                .ignore_errors())
    ok = {int(i) for i, _ in readable.as_numpy_iterator()}
    return [i for i in range(len(paths)) if i not in ok]


def decode_cache_dir() -> Path:
    """Where decode-check results are kept (``$MELANOMA_TF_CACHE``, default ``~/.cache/melanoma_tf``)."""
    return Path(os.environ.get("MELANOMA_TF_CACHE", "~/.cache/melanoma_tf")).expanduser()


def cached_unreadable_images(paths: list[str]) -> list[int]:
    """:func:`find_unreadable_images`, remembered per (path, size, mtime) of every file.

    Decoding 6,000 images takes ~15 s on 2 cores; a sweep starts hundreds of runs
    on the same files, so the answer is cached and recomputed when any file changes.
    """
    signature = hashlib.sha256(DECODING.encode())
    for path in paths:
        stat = os.stat(path)
        signature.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    cache = decode_cache_dir() / f"decode-check-{signature.hexdigest()[:24]}.json"
    if cache.is_file():
        try:
            return [int(i) for i in json.loads(cache.read_text())["unreadable"]]
        except (ValueError, KeyError):
            pass  # a damaged cache entry is recomputed
    bad = find_unreadable_images(paths)
    try:
        write_json(cache, {"n_files": len(paths), "unreadable": bad})
    except OSError:
        log.debug("cannot write the decode-check cache %s", cache)
    return bad


def drop_unreadable(frame: pd.DataFrame, on_corrupt: str, where: str, hint: str) -> tuple[pd.DataFrame, list[str]]:
    """``frame`` without the rows whose ``path`` the training decoder rejects, and their sorted image ids.

    With ``on_corrupt="error"`` a file that does not decode is a DataError naming the first ones
    (``where`` says which list they are in, ``hint`` how to go on); with ``"skip"`` a warning.
    """
    bad = cached_unreadable_images(frame["path"].tolist())
    if not bad:
        return frame.reset_index(drop=True), []
    message = (f"{len(bad)} image file(s){where} cannot be decoded (first: "
               f"{', '.join(frame['path'].iloc[bad[:3]])})")
    if on_corrupt == "error":
        raise DataError(f"{message}; {hint}")
    log.warning("%s; skipping them", message)
    return frame.drop(index=frame.index[bad]).reset_index(drop=True), sorted(frame["image_id"].iloc[bad])


def label_frame(frame: pd.DataFrame, mode: str) -> tuple[pd.DataFrame, list[str]]:
    """Adds the integer ``label`` column for ``binary`` (melanoma = 1) or ``multiclass`` mode."""
    frame = frame.copy()
    if mode == "binary":
        frame["label"] = (frame["dx"] == MELANOMA).astype(np.int64)
        return frame, ["not_melanoma", "melanoma"]
    if mode == "multiclass":
        frame["label"] = frame["dx"].map({dx: i for i, dx in enumerate(DX_CLASSES)}).astype(np.int64)
        return frame, list(DX_CLASSES)
    raise DataError(f"data.labels: unknown label mode {mode!r}")


def load_lesion_data(root: str | os.PathLike, metadata: str = "HAM10000_metadata.csv",
                     image_dirs: tuple[str, ...] = (), labels: str = "binary",
                     on_missing: str = "skip", on_corrupt: str = "skip",
                     check_decode: bool = True) -> LesionData:
    """Reads the metadata, finds the images that exist and decode, and labels them.

    Args:
      root: dataset folder.
      metadata: CSV file name relative to root (or absolute).
      image_dirs: image folders (see :func:`find_images`).
      labels: ``binary`` or ``multiclass``.
      on_missing: ``skip`` (warn with the count and first ids) or ``error``.
      on_corrupt: the same policy for files that do not decode.
      check_decode: decode every image once now (the default) to find corrupt files.

    Raises:
      DataError: see :func:`read_metadata`; or missing/corrupt images under the
        ``error`` policy; or no usable image at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root: folder not found: {root}")
    csv_path = Path(metadata) if Path(metadata).is_absolute() else root / metadata
    frame = read_metadata(csv_path)
    n_listed = len(frame)
    files = find_images(root, image_dirs)
    frame["path"] = frame["image_id"].map(lambda i: str(files[i]) if i in files else "")
    absent = frame["path"] == ""
    missing = sorted(frame.loc[absent, "image_id"])
    if missing:
        message = (f"{len(missing)} of {n_listed} images listed in {csv_path} are not on disk "
                   f"(first: {', '.join(missing[:5])})")
        if on_missing == "error":
            raise DataError(message + "; set data.on_missing: skip to train on the rest")
        log.warning("%s; skipping them", message)
    frame = frame.loc[~absent].sort_values("image_id").reset_index(drop=True)
    unreadable: list[str] = []
    if check_decode:
        frame, unreadable = drop_unreadable(frame, on_corrupt, "", "set data.on_corrupt: skip to train on the rest")
    if frame.empty:
        raise DataError(f"no usable image for the {n_listed} rows of {csv_path} under {root}")
    frame, names = label_frame(frame, labels)
    return LesionData(frame=frame, label_names=names, n_listed=n_listed, missing=missing,
                      unreadable=unreadable, metadata_path=str(csv_path))


# --------------------------------------------------------------------------- splits


def _grouped_folds(labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """Assigns each row a fold in [0, n_splits), stratified by label, grouped by lesion."""
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise DataError(f"only {n_groups} lesions: too few for {n_splits} stratified-grouped folds")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fold = np.full(len(labels), -1, dtype=np.int64)
    # StratifiedGroupKFold warns when a class has fewer members than folds; with
    # rare classes (df, vasc) that is expected and harmless here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for index, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            fold[test] = index
    return fold


def lesion_grouped_split(frame: pd.DataFrame, seed: int, holdout_fraction: float = 0.2,
                         val_fraction: float = 0.2, folds: int = 0, fold: int = 0,
                         holdout_source: Optional[str] = None, source_column: str = "dataset") -> pd.Series:
    """Splits images into train / val / holdout, stratified by label and grouped by lesion.

    The holdout is drawn first and depends only on the seed, so it never moves
    between cross-validation folds. With ``folds = K >= 2`` the rest is cut into K
    stratified-grouped folds and fold ``fold`` is the validation split; otherwise
    ``val_fraction`` of the rest is the validation split.

    With ``holdout_source`` the holdout is instead every image whose ``source_column``
    (HAM10000: ``dataset``) equals it (leave-one-clinic-out): no image of that source,
    and no lesion photographed in it, is trained or validated on.

    Args:
      frame: rows with ``image_id``, ``lesion_id``, ``label`` (and ``dataset`` for ``holdout_source``).
      seed: split seed; the same seed gives the same split on any machine.

    Returns:
      A Series of ``train|val|holdout`` aligned with frame's index.
    """
    order = np.argsort(frame["image_id"].to_numpy(), kind="stable")  # independent of row order
    labels = frame["label"].to_numpy()[order]
    groups = frame["lesion_id"].to_numpy()[order]
    resolution = min(_SPLIT_RESOLUTION, len(np.unique(groups)))
    holdout_folds = max(1, round(holdout_fraction * resolution))
    split = np.full(len(order), "train", dtype=object)
    if holdout_source is not None:
        sources = _holdout_source_values(frame, holdout_source, source_column)[order]
        held_lesions = set(groups[sources == holdout_source])
        split[np.isin(groups, list(held_lesions))] = "holdout"
    else:
        split[_grouped_folds(labels, groups, resolution, seed) < holdout_folds] = "holdout"
    rest = np.flatnonzero(split != "holdout")
    if folds >= 2:
        cv_fold = _grouped_folds(labels[rest], groups[rest], folds, seed + 1)
        split[rest[cv_fold == fold]] = "val"
    else:
        val_folds = max(1, round(val_fraction * resolution))
        inner = _grouped_folds(labels[rest], groups[rest], resolution, seed + 1)
        split[rest[inner < val_folds]] = "val"
    result = np.empty(len(order), dtype=object)
    result[order] = split
    return pd.Series(result, index=frame.index, name="split")


def _holdout_source_values(frame: pd.DataFrame, source: str, column: str = "dataset") -> np.ndarray:
    """The source column, after checking that ``source`` is one of its values and leaves data to train on."""
    if column not in frame.columns:
        raise DataError(f"data.holdout_source: {source!r} needs a {column!r} column (data.source_column) in the "
                        f"metadata, which has only {sorted(frame.columns)}")
    values = frame[column].astype(str).to_numpy()
    present = sorted(set(values))
    if source not in present:
        raise DataError(f"data.holdout_source: no image has {column} {source!r}; the sources present are {present}")
    if len(present) < 2:
        raise DataError(f"data.holdout_source: {source!r} is the only source: nothing would be left to train on")
    return values


def manifest_csv(frame: pd.DataFrame) -> str:
    """The split manifest: ``image_id,lesion_id,label,split``, sorted by image_id."""
    columns = ["image_id", "lesion_id", "label", "split"]
    table = frame[columns].sort_values("image_id")
    buffer = io.StringIO()
    table.to_csv(buffer, index=False, lineterminator="\n")
    return buffer.getvalue()


def write_split_manifest(frame: pd.DataFrame, folder: str | os.PathLike, extra: dict | None = None) -> str:
    """Writes ``splits.csv`` and ``splits.json`` (its sha256, counts, data summary).

    Returns:
      The sha256 of ``splits.csv``.
    """
    folder = Path(folder)
    text = manifest_csv(frame)
    digest = hashlib.sha256(text.encode()).hexdigest()
    write_atomic(folder / "splits.csv", text)
    counts = {}
    for name in SPLITS:
        part = frame[frame["split"] == name]
        label_counts = part["label"].value_counts().sort_index()
        counts[name] = {"images": int(len(part)), "lesions": int(part["lesion_id"].nunique()),
                        "label_counts": {int(k): int(v) for k, v in label_counts.items()}}
    write_json(folder / "splits.json", {"sha256": digest, "counts": counts, **(extra or {})})
    return digest


def read_split_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Reads a ``splits.csv`` written by :func:`write_split_manifest`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split manifest not found: {path}")
    frame = pd.read_csv(path, dtype={"image_id": str, "lesion_id": str})
    missing = [c for c in ("image_id", "lesion_id", "label", "split") if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}")
    bad = ~frame["split"].isin(SPLITS)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}: row {row + 2}: unknown split {frame['split'].iloc[row]!r}")
    return frame


@dataclass
class PreparedData:
    """Usable images with their split, plus what the reader found."""

    frame: pd.DataFrame  # image_id, lesion_id, label, path, split, metadata columns
    label_names: list[str]
    summary: dict

    def part(self, split: str) -> pd.DataFrame:
        return self.frame[self.frame["split"] == split].reset_index(drop=True)
