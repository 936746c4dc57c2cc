"""Run folders and the data of a run: where runs live, how they resume, which images a split holds.

Shared by every command (train, evaluate, quantize, baselines, sweep), so no command imports another
for them.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from melanoma_tf import config as cfgmod
from melanoma_tf import data as datamod
from melanoma_tf import losses, synthetic
from melanoma_tf.config import Config, ConfigError
from melanoma_tf.data import PreparedData
from melanoma_tf.errors import MelanomaTfError

log = logging.getLogger("melanoma_tf.train")  # these lines are part of a training run's log


class RunError(MelanomaTfError, ValueError):
    """A run folder is missing, incomplete, or its images have moved; the message names it."""


def loss_for(cfg: Config, class_weights: np.ndarray):
    """The student loss of ``cfg.loss`` for ``cfg.data.labels`` (binary or multiclass)."""
    return losses.student_loss(cfg.loss.name, cfg.data.labels, pos_weight=cfg.loss.pos_weight,
                               gamma=cfg.loss.gamma, focal_alpha=cfg.loss.focal_alpha,
                               class_weights=class_weights)


def dataset_root(cfg: Config) -> Path:
    """``data.root``, or the built-in synthetic dataset (generated on first use)."""
    if cfg.data.root:
        return Path(cfg.data.root).expanduser()
    syn = cfg.data.synthetic
    params = dict(n_lesions=syn.n_lesions, melanoma_fraction=syn.melanoma_fraction,
                  image_size=syn.image_size, second_image_fraction=syn.second_image_fraction, seed=cfg.data_seed)
    folder = synthetic.default_dir(syn.dir, **params)
    log.info("data.root is null: using the synthetic dataset in %s", folder)
    return synthetic.generate(folder, **params)


def prepare_data(cfg: Config) -> PreparedData:
    """Reads the metadata and images, labels them and assigns the lesion-grouped split."""
    d = cfg.data
    lesions = datamod.load_lesion_data(dataset_root(cfg), d.metadata, d.image_dirs, d.labels,
                                       d.on_missing, d.on_corrupt)
    frame = lesions.frame
    frame["split"] = datamod.lesion_grouped_split(frame, cfg.data_seed, d.holdout_fraction, d.val_fraction,
                                                  d.folds, d.fold, d.holdout_source, d.source_column)
    for split in ("train", "val") + (("holdout",) if d.holdout_source else ()):
        labels = frame.loc[frame["split"] == split, "label"]
        if labels.nunique() < 2:
            raise datamod.DataError(f"the {split} split has only one class ({len(labels)} images); "
                                    "more data or a different split fraction is needed")
    return PreparedData(frame, lesions.label_names, lesions.summary())



# --------------------------------------------------------------------------- run folders


def new_run_dir(cfg: Config) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.output.dir) / f"{cfg.output.name}-{stamp}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    run_dir.mkdir(parents=True)
    return run_dir


def find_resumable(cfg: Config, explicit: Optional[str]) -> Path:
    """The run folder to resume: the named one, or the newest of this config's name.

    Raises:
      ConfigError: no such run, or its saved config differs from this one.
    """
    if explicit:
        run_dir = Path(explicit)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {run_dir}: not a run folder (no config.yaml)")
    else:
        candidates = sorted(p for p in Path(cfg.output.dir).glob(f"{cfg.output.name}-*")
                            if (p / "config.yaml").is_file())
        if not candidates:
            raise ConfigError(f"--resume: no earlier run named {cfg.output.name!r} in {cfg.output.dir}")
        run_dir = candidates[-1]
    saved = cfgmod.load(run_dir / "config.yaml")
    if cfgmod.fingerprint(saved) != cfgmod.fingerprint(cfg):
        old, new = _flatten(cfgmod.to_dict(saved)), _flatten(cfgmod.to_dict(cfg))
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and not k.startswith("output.")
                and k != "train.verbose"]
        raise ConfigError(f"--resume {run_dir}: the config differs from the run's in {diff}")
    return run_dir


def _flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def resolve_stage_dir(run_dir: str | Path) -> Path:
    """The folder holding model.keras: the run itself, or the last stage of a chained run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"--run {run_dir}: not a run folder (no config.yaml)")
    if (run_dir / "model.keras").is_file():
        return run_dir
    cfg = cfgmod.load(run_dir / "config.yaml")
    for stage in reversed(cfg.stages):
        if (run_dir / stage / "model.keras").is_file():
            return run_dir / stage
    raise RunError(f"--run {run_dir}: no model.keras in the run or its stage folders")


OOF_FILE = "oof_logits.csv"  # a cross-fitted run's out-of-fold logits (melanoma_tf.crossfit)


def read_out_of_fold(stage_dir: Path) -> Optional[pd.DataFrame]:
    """A cross-fitted run's out-of-fold logits (``oof_logits.csv``), or None for any other run."""
    path = Path(stage_dir) / OOF_FILE
    if not path.is_file():
        return None
    frame = datamod.read_csv_table(path)
    missing = {"image_id", "melanoma", "logit"} - set(frame.columns)
    if missing:
        raise RunError(f"{path}: missing column(s) {sorted(missing)}")
    if frame["logit"].isna().any() or not frame["melanoma"].isin([0, 1]).all():
        raise RunError(f"{path}: a logit is blank or a melanoma label is not 0/1")
    return frame


def split_frame(cfg: Config, stage_dir: Path, split: str) -> pd.DataFrame:
    """Rows of one split of the run's manifest, with image paths and metadata columns."""
    manifest = datamod.read_split_manifest(stage_dir / "splits.csv")
    root = dataset_root(cfg)
    metadata = datamod.read_metadata(Path(cfg.data.metadata) if Path(cfg.data.metadata).is_absolute()
                                     else root / cfg.data.metadata)
    files = datamod.find_images(root, cfg.data.image_dirs)
    part = manifest[manifest["split"] == split]
    if part.empty:
        raise RunError(f"{stage_dir / 'splits.csv'}: no image in split {split!r}")
    missing = [i for i in part["image_id"] if i not in files]
    if missing:
        raise RunError(f"{len(missing)} images of the {split} split are no longer under {root} "
                              f"(first: {missing[0]})")
    extra = metadata.drop(columns=["lesion_id"]).set_index("image_id")
    frame = part.join(extra, on="image_id")
    frame["path"] = [str(files[i]) for i in frame["image_id"]]
    return frame.reset_index(drop=True)
