"""Train the teacher, the student, or distil the teacher into the student.

    python -m melanoma_tf.train --config configs/quickstart.yaml [--set key=value ...] [--resume [RUN_DIR]]

A run folder (``output.dir/<name>-<timestamp>``) holds the resolved config,
the split manifest, TensorBoard logs, ``history.csv``, the best weights, the
final ``model.keras`` and ``metrics.json``; a chained run (several
``stages``) has one such sub-folder per stage. ``--resume`` continues the
newest run of the same config (or the named folder) from its last completed
epoch; finished stages are not run again. The last line printed is
``run: <run folder>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from melanoma_tf import callbacks as cb
from melanoma_tf import metrics as M
from melanoma_tf import config as cfgmod
from melanoma_tf import data as datamod
from melanoma_tf import finetune, models, pretrained, report
from melanoma_tf.backend import keras, make_strategy, set_global_seed
from melanoma_tf.cli import run_main
from melanoma_tf.config import Config
from melanoma_tf.data import PreparedData
from melanoma_tf.distill import method_for
from melanoma_tf.distill.teachers import resolve_teacher_paths
from melanoma_tf.files import write_json
from melanoma_tf.fit import (
    Loop,
    fit_student,
    phases_for,
    scheduled_optimizer,
    training_datasets,
    unfreeze_for_finetuning,
)
from melanoma_tf.pipeline import class_weights, load_images
from melanoma_tf.plots import history_plot
from melanoma_tf.runs import find_resumable, loss_for, new_run_dir, prepare_data

log = logging.getLogger("melanoma_tf.train")


# --------------------------------------------------------------------------- one stage


def prepare_start_weights(model, stage: str, cfg: Config, train: pd.DataFrame) -> dict:
    """Says which weights the stage starts from and re-estimates BatchNorm statistics when configured.

    Imported weights with folded BatchNorm (a ``.tflite``) leave every BatchNorm at
    the identity; ``bn_reestimate_images: N`` measures the statistics on N training
    images (a seeded sample, not augmented) before the first step, keeping the
    model's function unchanged (:func:`melanoma_tf.pretrained.reestimate_batchnorm`).

    Returns:
      ``{"source", "name", "sha256", "bn_reestimated_on"}`` (file names only, no machine
      paths), which the stage writes to ``start_weights.json`` and ``metrics.json``.
    """
    model_cfg = cfg.teacher if stage == "teacher" else cfg.student
    weights = model_cfg.weights
    if weights is None:
        info = {"source": "random initialisation"}
    elif weights == "imagenet":
        info = {"source": "imagenet (keras.applications download)"}
    else:
        info = {"source": "file", **pretrained.describe_weights(models.weights_file(weights))}
        if weights in cfgmod.TEACHER_PACKAGES:
            info["package"] = weights
    count = min(model_cfg.bn_reestimate_images, len(train))
    if count:
        rows = np.random.default_rng(cfg.seed).choice(len(train), size=count, replace=False)
        images = load_images(train["path"].iloc[np.sort(rows)].tolist(), cfg.data.image_size)
        layers = pretrained.reestimate_batchnorm(model, images)
        info["bn_reestimated_on"] = f"{count} training images ({layers} BatchNorm layers)"
    log.info("stage %s starts from %s", stage, ", ".join(f"{k}: {v}" for k, v in info.items()))
    return info


def _stage_model(stage: str, cfg: Config, image_size: int):
    if stage == "teacher":
        return models.build_teacher(cfg.teacher, image_size, cfg.num_outputs, cfg.data.colour_constancy)
    return models.build_student(cfg.student, image_size, cfg.num_outputs, cfg.data.colour_constancy)


def _start_weights(student, stage: str, cfg: Config, data: PreparedData, folder: Path, resume: bool) -> Optional[dict]:
    """The start weights' description (None when a checkpoint replaces them on resume)."""
    if resume and int(cb.load_state(folder).get("epoch", 0)):
        return None
    info = prepare_start_weights(student, stage, cfg, data.part("train"))
    write_json(folder / "start_weights.json", info)
    return info


def train_stage(stage: str, cfg: Config, data: PreparedData, folder: Path,
                teacher_paths: Optional[list[Path]] = None, resume: bool = False) -> dict:
    """Trains one stage in ``folder`` and returns its metrics.

    Args:
      stage: ``teacher``, ``student`` or ``distill`` (trained by ``distill.method``).
      cfg: the resolved config.
      data: the split data.
      folder: the stage's run folder (config, splits, checkpoints, model).
      teacher_paths: the teacher ``.keras`` file(s) for ``distill`` (several: an ensemble).
      resume: continue from ``folder/state.json`` if present.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "metrics.json").is_file() and resume:
        log.info("stage %s already finished in %s", stage, folder)
        return json.loads((folder / "metrics.json").read_text())
    cfgmod.save(cfg, folder / "config.yaml")
    digest = datamod.write_split_manifest(data.frame, folder, {"data": data.summary, "seed": cfg.seed})
    set_global_seed(cfg.seed, deterministic=cfg.train.deterministic)
    method = method_for(stage, cfg, teacher_paths)
    train_labels = data.part("train")["label"].to_numpy()
    weights_per_class = class_weights(train_labels, 2 if cfg.data.labels == "binary" else cfg.num_outputs)
    sample_weights = weights_per_class[train_labels] if cfg.data.class_weight == "balanced" else None
    loss_fn = loss_for(cfg, weights_per_class)
    strategy = make_strategy(cfg.train.distribution)
    if strategy.num_replicas_in_sync > 1:
        log.info("training on %d replicas (%s); global batch %d", strategy.num_replicas_in_sync,
                 type(strategy).__name__, cfg.train.batch_size)
    with strategy.scope():  # variables of the models and optimizers live on every replica
        student = _stage_model(stage, cfg, cfg.data.image_size)
        teacher = method.build_teacher(cfg.data.image_size)
    weights_info = _start_weights(student, stage, cfg, data, folder, resume)
    if cfg.train.linear_probe and weights_info is not None:  # LP-FT: the head fitted before the first step
        weights_info["linear_probe"] = finetune.linear_probe(student, cfg, data)
        finetune.save_start(student, folder)
        write_json(folder / "start_weights.json", weights_info)
    method.prepare(data, folder)
    train_ds, steps, val_images = training_datasets(cfg, data, sample_weights, method.dataset_options())

    def on_plateau(phase):
        if cfg.train.lr_schedule != "plateau":
            return []
        return [keras.callbacks.ReduceLROnPlateau(monitor=cb.MONITOR, mode="max", factor=0.5, patience=2,
                                                  min_lr=phase.lr / 100)]

    loop = Loop(train_ds, val_images, data.part("val")["label"].to_numpy(), loss_fn, cfg.data.labels,
                make_trainer=lambda model: method.trainer(model, loss_fn, train_labels, teacher),
                optimizer_for=lambda phase: scheduled_optimizer(cfg, phase, steps, student),
                checkpoint_state=method.checkpoint_state, method_callbacks=method.callbacks,
                schedule_callbacks=on_plateau, before_phase=unfreeze_for_finetuning(cfg, folder),
                patience=cfg.train.early_stopping_patience, ema_decay=cfg.train.ema_decay, tensorboard=True,
                verbose=cfg.train.verbose, strategy=strategy, name=f"stage {stage}")
    trainer = fit_student(student, loop, folder, phases_for(stage, cfg), resume)
    summary = method.summary()
    if cfg.train.wise_ft is not None:  # WiSE-FT: the kept model interpolates the start and the best epoch
        finetune.interpolate_weights(student, folder / finetune.START / "model.keras", cfg.train.wise_ft)
        val_z = student.predict(val_images, verbose=0)
        summary["wise_ft"] = {"weight": cfg.train.wise_ft, "val_roc_auc": (
            M.roc_auc(data.part("val")["label"].to_numpy(), val_z.ravel()) if cfg.data.labels == "binary" else None)}
    models.save_model(student, folder / "model.keras")
    if trainer is not None:
        method.save_outputs(trainer, folder)
    return _stage_result(stage, folder, student, data, digest, weights_info, summary)


def _stage_result(stage: str, folder: Path, student, data: PreparedData, digest: str,
                  weights_info: Optional[dict], method_summary: dict) -> dict:
    """The stage's ``metrics.json`` (validation scores at the best epoch, sizes, start weights) and history plot."""
    state = cb.load_state(folder)
    history = state.get("history", [])
    best = next((row for row in history if row["epoch"] == state.get("best_epoch")), history[-1] if history else {})
    result = {
        "stage": stage,
        "val_roc_auc": best.get("val_roc_auc"),
        "val_pr_auc": best.get("val_pr_auc"),
        "val_loss": best.get("val_loss"),
        "best_epoch": state.get("best_epoch"),
        "epochs_run": len(history),
        "seconds_per_epoch_median": float(np.median([r["seconds"] for r in history])) if history else None,
        "n_train": int(len(data.part("train"))),
        "n_val": int(len(data.part("val"))),
        "params": int(student.count_params()),
        "splits_sha256": digest,
    }
    for key in ("val_bma", "val_acc", "val_f1", "val_spec_at_sens95"):
        if key in best:
            result[key] = best[key]
    if weights_info is None and (folder / "start_weights.json").is_file():
        weights_info = json.loads((folder / "start_weights.json").read_text())
    result["start_weights"] = weights_info
    result.update(method_summary)
    if history:
        history_plot(folder / "history.png", history)
    write_json(folder / "metrics.json", result)
    return result


# --------------------------------------------------------------------------- the command


def run(cfg: Config, resume: bool = False, resume_dir: Optional[str] = None,
        run_dir: Optional[str | Path] = None) -> Path:
    """Runs every stage of the config; returns the run folder.

    Args:
      cfg: the resolved config.
      resume: continue the newest run of this config (or ``resume_dir``).
      resume_dir: the run folder to continue.
      run_dir: use exactly this folder: start it if new, continue it if it holds a
        run of the same config (what sweeps use for resumable trials).
    """
    if run_dir is not None:
        run_dir = Path(run_dir)
        resume = (run_dir / "config.yaml").is_file()
        if resume:
            find_resumable(cfg, str(run_dir))  # refuses a different config
    elif resume:
        run_dir = find_resumable(cfg, resume_dir)
    data = prepare_data(cfg)  # bad data fails here, before a run folder is made
    teacher_paths = resolve_teacher_paths(cfg.distill.teacher) if cfg.distill.teacher else None
    if run_dir is None:
        run_dir = new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("run folder: %s", run_dir)
    cfgmod.save(cfg, run_dir / "config.yaml")
    summary = data.summary
    log.info("data: %d usable images of %d listed (%d missing, %d unreadable); split %s",
             summary["n_images"], summary["n_listed"], summary["n_missing"], summary["n_unreadable"],
             data.frame["split"].value_counts().to_dict())
    chained = len(cfg.stages) > 1
    if chained:
        datamod.write_split_manifest(data.frame, run_dir, {"data": summary, "seed": cfg.seed})
    results = {}
    for stage in cfg.stages:
        folder = run_dir / stage if chained else run_dir
        if stage == "distill" and teacher_paths is None:
            teacher_paths = [run_dir / "teacher" / "model.keras"]
        print(f"== stage {stage} -> {folder}", flush=True)
        results[stage] = train_stage(stage, cfg, data, folder, teacher_paths, resume)
        print(f"== stage {stage}: val ROC-AUC {results[stage]['val_roc_auc']:.4f}, "
              f"PR-AUC {results[stage]['val_pr_auc']:.4f}", flush=True)
    if chained:
        write_json(run_dir / "metrics.json", {"stages": results,
                                              **{f"{k}_val_roc_auc": v["val_roc_auc"] for k, v in results.items()}})
    if cfg.output.evaluate:
        evaluate_stages(run_dir, [run_dir / s for s in cfg.stages] if chained else [run_dir])
    return run_dir


def evaluate_stages(run_dir: Path, folders: list[Path]) -> Path:
    """Evaluates each stage on the holdout and compares them.

    The stages not evaluated yet are scored one after another in one fresh one-thread process
    (honest batch-1 latency; TensorFlow is imported once).
    """
    pending = [folder for folder in folders if not (folder / "eval_holdout" / "report.md").is_file()]
    if pending:
        print(f"== evaluate {', '.join(str(folder) for folder in pending)}", flush=True)
        subprocess.run([sys.executable, "-m", "melanoma_tf.evaluate", "--run", *map(str, pending)], check=True)
    path = report.compare([str(f) for f in folders], str(run_dir / "compare"))
    print(f"== comparison: {path}", flush=True)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m melanoma_tf.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                        help="continue the newest run of this config (or RUN_DIR) from its last completed epoch")
    parser.add_argument("--run-dir", help="use exactly this run folder: start it, or continue it if it exists")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> str:
        cfg = cfgmod.load(args.config, args.overrides)
        return f"run: {run(cfg, resume=args.resume is not None, resume_dir=args.resume or None, run_dir=args.run_dir)}"

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())
