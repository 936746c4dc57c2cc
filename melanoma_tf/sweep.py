"""Sweeps: a grid or random search over config settings, K folds per trial, resumable.

    python -m melanoma_tf.sweep --config configs/sweep_<name>.yaml [--set key=value ...]

A sweep YAML names a base experiment config and the axes to vary::

    base: student_mobilenetv3.yaml        # relative to the sweep file
    set: [data.image_size=96]              # overrides applied to every trial
    axes:
      student.pooling: [avg, max]          # one key per axis ...
      loss:                                # ... or named compound values
        bce: {loss.name: bce}
        wbce_0.7: {loss.name: wbce, loss.pos_weight: 0.7}
    search: grid                           # or random, with trials: N
    folds: 3                               # K-fold CV of the non-holdout part per trial (0: one split)
    workers: 1                             # parallel training processes (backend local)
    output: runs/sweeps

Each (trial, fold) is an ordinary run folder, ``<output>/<sweep>/<trial>/fold-<i>``,
trained by ``python -m melanoma_tf.train --run-dir``: a finished one is never
run again, a killed one resumes from its last completed epoch. The sweep
writes ``results.csv`` / ``results.md`` (mean +- std over folds per trial),
the metric per axis, and ROC-AUC against model size with the Pareto front.
The last line printed is ``sweep: <folder>``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from melanoma_tf import config as cfgmod
from melanoma_tf import plots
from melanoma_tf.cli import run_main
from melanoma_tf.config import ConfigError
from melanoma_tf.errors import TrialError
from melanoma_tf.files import write_atomic
from melanoma_tf.sweep_ray import run_with_ray

log = logging.getLogger("melanoma_tf.sweep")
SCORES = cfgmod.VALIDATION_SCORES  # each (trial, fold) at its best epoch; mean +- std over folds


@dataclass
class SweepSpec:
    name: str
    base: Path
    overrides: list[str]
    axes: dict[str, dict[str, dict[str, Any]]]  # axis -> value label -> {config key: value}
    search: str = "grid"
    trials: Optional[int] = None
    folds: int = 0
    workers: int = 1
    seed: int = 0
    output: str = "runs/sweeps"
    metric: str = "val_roc_auc"
    backend: str = "local"
    extra: list[str] = field(default_factory=list)
    quantize: list[str] = field(default_factory=list)  # post-training modes scored per trained run
    ray: dict[str, Any] = field(default_factory=dict)  # address, cpus_per_trial, gpus_per_trial

    @property
    def columns(self) -> list[str]:
        """The axes of the results table: the config axes, then quantization when swept."""
        return list(self.axes) + (["quantization"] if self.quantize else [])


def load_sweep(path: str | Path, overrides: list[str] = ()) -> SweepSpec:
    """Reads and checks a sweep YAML (:class:`melanoma_tf.config.SweepConfig`); errors name the key."""
    path = Path(path)
    sweep = cfgmod.load_sweep_config(path)
    base = path.parent / sweep.base if not Path(sweep.base).is_absolute() else Path(sweep.base)
    if not base.is_file():
        base = Path(sweep.base)
    if not base.is_file():
        raise ConfigError(f"{path}: base: config not found: {sweep.base}")
    axes = {axis: ({_label(v): {axis: v} for v in values} if isinstance(values, list)
                   else {str(label): dict(setting) for label, setting in values.items()})
            for axis, values in sweep.axes.items()}
    spec = SweepSpec(name=path.stem, base=base.resolve(),  # trials may run elsewhere (Ray workers)
                     overrides=list(sweep.set), axes=axes, search=sweep.search, trials=sweep.trials,
                     folds=sweep.folds, workers=sweep.workers, seed=sweep.seed, output=sweep.output,
                     metric=sweep.metric, backend=sweep.backend, extra=list(overrides), quantize=list(sweep.quantize),
                     ray=cfgmod.to_dict(sweep)["ray"])
    # Every trial's config must be valid before anything trains.
    for trial in trials(spec):
        for fold in range(max(spec.folds, 1)):
            cfgmod.load(spec.base, trial_overrides(spec, trial, fold, Path("/tmp/x")))
    return spec


def _label(value: Any) -> str:
    return str(value)


def trials(spec: SweepSpec) -> list[dict[str, str]]:
    """Trials as {axis: value label}: the full grid, or a seeded random sample of it."""
    names = list(spec.axes)
    grid = [dict(zip(names, combo)) for combo in itertools.product(*(list(spec.axes[a]) for a in names))]
    if spec.search == "random":
        rng = np.random.default_rng(spec.seed)
        grid = [grid[i] for i in rng.permutation(len(grid))[: spec.trials]]
    elif spec.trials:
        grid = grid[: spec.trials]
    return grid


def trial_id(trial: dict[str, str]) -> str:
    text = json.dumps(trial, sort_keys=True)
    readable = "_".join(f"{v}" for v in trial.values()).replace("/", "-")[:60]
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def trial_overrides(spec: SweepSpec, trial: dict[str, str], fold: int, folder: Path) -> list[str]:
    out = list(spec.overrides)
    for axis, label in trial.items():
        out += [f"{key}={json.dumps(value) if not isinstance(value, str) else value}"
                for key, value in spec.axes[axis][label].items()]
    if spec.folds:
        out += [f"data.folds={spec.folds}", f"data.fold={fold}"]
    out += spec.extra
    out += [f"output.dir={folder.parent}", f"output.name={folder.name}"]
    return out


def run_one(spec: SweepSpec, trial: dict[str, str], fold: int, root: Path, cwd: Optional[str] = None) -> list[dict]:
    """Trains and scores one (trial, fold) in child processes; finished steps are skipped.

    Returns one row per scored model: the Keras model, then one per
    quantization mode of the sweep (each converted and scored on the validation
    split, with its size and batch-1 latency).
    """
    folder = root / trial_id(trial) / f"fold-{fold}"
    metrics_file = folder / "metrics.json"
    log_path = folder.parent / f"fold-{fold}.log"
    if not metrics_file.is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "melanoma_tf.train", "--config", str(spec.base), "--run-dir", str(folder)]
        for item in trial_overrides(spec, trial, fold, folder):
            command += ["--set", item]
        _run_logged(command, log_path, cwd, f"trial {trial_id(trial)} fold {fold} failed")
        if not metrics_file.is_file():
            raise TrialError(f"trial {trial_id(trial)} fold {fold} wrote no metrics.json; see {log_path}")
    metrics = json.loads(metrics_file.read_text())
    if "stages" in metrics:  # chained config: the last stage is the trial's model
        metrics = list(metrics["stages"].values())[-1]
    scored = _scored_on_val(spec, folder, log_path, cwd)
    base = {"trial": trial_id(trial), **trial, "fold": fold, **{k: metrics.get(k) for k in
            (*SCORES, "params", "epochs_run", "seconds_per_epoch_median")}}
    keras_row = scored["keras fp32"]

    def external(row: dict) -> dict:  # reported beside validation, never used to rank trials
        return {k: v for k, v in row.items() if k.startswith("ext_")}

    rows = [{**base, "size_mb": keras_row["size_mb"], "latency_ms": keras_row["latency_ms_median"],
             **external(keras_row)}]
    if spec.quantize:
        rows[0]["quantization"] = "keras"
        for mode in spec.quantize:
            r = scored[mode]
            rows.append({**{k: v for k, v in base.items() if k not in SCORES}, "quantization": mode,
                         "val_roc_auc": r["roc_auc"], "val_spec_at_sens95": r["specificity"],
                         "size_mb": r["size_mb"], "latency_ms": r["latency_ms_median"], **external(r)})
    return rows


def _run_logged(command: list[str], log_path: Path, cwd: Optional[str], failure: str) -> None:
    with open(log_path, "a") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd)
    if result.returncode != 0:
        raise TrialError(f"{failure}; see {log_path}")


def _scored_on_val(spec: SweepSpec, folder: Path, log_path: Path, cwd: Optional[str]) -> dict[str, dict]:
    """The run's validation scores, size and latency per model (Keras, and each quantization mode)."""
    def table() -> dict[str, dict]:
        found = sorted(folder.rglob("tflite/comparison_val.csv"))
        return {r["mode"]: r for r in pd.read_csv(found[-1]).to_dict("records")} if found else {}

    scored = table()
    if not {"keras fp32", *spec.quantize} <= set(scored):
        command = [sys.executable, "-m", "melanoma_tf.quantize", "--run", str(folder), "--split", "val",
                   "--modes", ",".join(spec.quantize), "--bootstrap", "50", "--latency-runs", "20",
                   "--representative", "100", "--qat-epochs", "1"]
        _run_logged(command, log_path, cwd, f"scoring {folder} on the validation split failed")
        scored = table()
    return scored


def summarise(rows: pd.DataFrame, spec: SweepSpec) -> pd.DataFrame:
    """Mean and std over folds per trial, best first."""
    metrics = _scores(rows) + ["latency_ms"]
    keys = ["trial", *spec.columns]
    grouped = rows.groupby(keys, sort=False)
    table = grouped[metrics].agg(["mean", "std"])
    table.columns = [f"{m}_{s}" for m, s in table.columns]
    table = table.join(grouped[["params", "size_mb"]].first()).join(grouped["fold"].count().rename("folds"))
    return table.reset_index().sort_values(f"{spec.metric}_mean", ascending=False)


def _scores(rows: pd.DataFrame) -> list[str]:
    """Validation scores, then the external sets' ROC-AUC (``ext_<name>_roc_auc``), which are only reported."""
    external = sorted(c for c in rows.columns if c.startswith("ext_") and rows[c].notna().any())
    return [c for c in SCORES if c in rows and rows[c].notna().any()] + external


def pareto_front(sizes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Boolean mask of trials no other trial beats on both size (smaller) and score (higher)."""
    front = np.ones(len(sizes), dtype=bool)
    for i in range(len(sizes)):
        dominated = (sizes <= sizes[i]) & (scores >= scores[i]) & ((sizes < sizes[i]) | (scores > scores[i]))
        front[i] = not dominated.any()
    return front


def write_results(root: Path, rows: pd.DataFrame, spec: SweepSpec) -> pd.DataFrame:
    table = summarise(rows, spec)
    write_atomic(root / "folds.csv", rows.to_csv(index=False))
    write_atomic(root / "results.csv", table.to_csv(index=False))
    metric = spec.metric
    columns = spec.columns
    scores = [metric] + [m for m in _scores(rows) if m != metric]
    lines = [f"# Sweep {spec.name}: {len(table)} rows x {max(spec.folds, 1)} fold(s), sorted by {metric}", "",
             "Validation scores at each run's best epoch (quantized models: scored on the same validation "
             "images), mean +- std over folds; binary spec_at_sens95 is the specificity at 95% sensitivity on "
             "the fold's own validation images. Latency: batch 1, one thread, this machine.", "",
             "| " + " | ".join(["trial", *columns, *scores, "params", "size MB", "latency ms"]) + " |",
             "|" + "---|" * (len(columns) + len(scores) + 4)]

    def cell(r, m, digits=4):
        mean, std = r.get(f"{m}_mean"), r.get(f"{m}_std")
        if mean is None or not np.isfinite(mean):
            return "n/a"
        return f"{mean:.{digits}f}" + (f" +- {std:.{digits}f}" if std is not None and np.isfinite(std) else "")

    for r in table.to_dict("records"):
        lines.append("| " + " | ".join([r["trial"], *(str(r[a]) for a in columns),
                                        *(cell(r, m) for m in scores), f"{int(r['params']):,}",
                                        f"{r['size_mb']:.2f}", cell(r, "latency_ms", 2)]) + " |")
    fig, axes = plots.plt.subplots(1, len(columns), figsize=(4 * len(columns), 3.2), squeeze=False)
    for ax, axis in zip(axes[0], columns):
        labels = list(spec.axes[axis]) if axis in spec.axes else ["keras", *spec.quantize]
        values = [rows.loc[rows[axis] == label, metric].dropna().to_numpy() for label in labels]
        ax.boxplot(values, tick_labels=labels)
        ax.set(title=axis, ylabel=metric)
    plots.save(fig, root / "metric_per_axis.png")
    names = table["trial"] + (" " + table["quantization"] if spec.quantize else "")
    score = table[f"{metric}_mean"].to_numpy(float)
    fronts = {}
    for key, column, label in (("size", "size_mb", "model size (MB)"),
                               ("latency", "latency_ms_mean", "latency ms (batch 1, 1 thread)")):
        cost = table[column].to_numpy(float)
        front = pareto_front(cost, score)
        fronts[key] = ", ".join(names[front])
        fig, ax = plots.plt.subplots(figsize=(6, 4))
        ax.scatter(cost[~front], score[~front], color="grey", label="trials")
        ax.scatter(cost[front], score[front], color="red", label="Pareto front")
        ax.set(xlabel=label, ylabel=metric, title=f"{metric} vs {key}")
        ax.legend(fontsize=7)
        plots.save(fig, root / f"pareto_{key}.png")
    lines += ["", f"Pareto front (size vs {metric}): {fronts['size']}", "",
              f"Pareto front (latency vs {metric}): {fronts['latency']}", "",
              "![metric per axis](metric_per_axis.png)", "", "![Pareto front, size](pareto_size.png)", "",
              "![Pareto front, latency](pareto_latency.png)", ""]
    write_atomic(root / "results.md", "\n".join(lines))
    return table


def run_sweep(spec: SweepSpec) -> Path:
    """Runs every (trial, fold) not yet finished and writes the results; returns the sweep folder."""
    root = (Path(spec.output) / spec.name).resolve()
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(root / "sweep.json", json.dumps({"base": str(spec.base), "axes": spec.axes, "search": spec.search,
                                                   "folds": spec.folds, "set": spec.overrides + spec.extra,
                                                   "quantize": spec.quantize, "backend": spec.backend},
                                                  indent=2, default=str))
    jobs = [(trial, fold) for trial in trials(spec) for fold in range(max(spec.folds, 1))]
    log.info("sweep %s: %d trials x %d fold(s) = %d runs (%s backend)", spec.name, len(trials(spec)),
             max(spec.folds, 1), len(jobs), spec.backend)
    cwd = str(Path.cwd())  # relative paths in the overrides (data.root) mean the same for every worker
    if spec.backend == "ray":
        nested = run_with_ray(spec, jobs, root, lambda trial, fold: run_one(spec, trial, fold, root, cwd))
    else:
        with ThreadPoolExecutor(max_workers=spec.workers) as pool:  # each job is its own training process
            nested = list(pool.map(lambda job: run_one(spec, job[0], job[1], root, cwd), jobs))
    rows = [row for job_rows in nested for row in job_rows]
    table = write_results(root, pd.DataFrame(rows), spec)
    print((root / "results.md").read_text().split("\n\n![")[0])
    log.info("best: %s", table["trial"].iloc[0])
    return root


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m melanoma_tf.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="sweep YAML (configs/sweep_*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every trial's config (e.g. data.root=...)")
    args = parser.parse_args(argv)
    return run_main(lambda: f"sweep: {run_sweep(load_sweep(args.config, args.overrides))}")


if __name__ == "__main__":
    sys.exit(main())
