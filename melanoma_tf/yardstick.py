"""The multi-clinic yardstick: leave-one-clinic-out and a random holdout, over seeds, in one command.

    python -m melanoma_tf.yardstick --config configs/<experiment>.yaml [--set key=value ...]
        [--seeds 1,2,3] [--clinics rosendahl,vidir_modern] [--reported vienna_dias] [--no-random]
        [--workers 1] [--backend local|ray] [--out FOLDER]
    python -m melanoma_tf.yardstick --compare FOLDER_A FOLDER_B [--out FOLDER]

For every clinic (``data.source_column`` of the metadata, HAM10000's ``dataset``) with
at least ``--min-melanomas`` melanomas among the images present, one model per seed
is trained on the other clinics and scored on it (``data.holdout_source``); clinics
with fewer, but at least ``--min-reported``, are scored too and reported outside the
mean; a random lesion-grouped holdout is trained per seed as well, for the pooled
holdout score and the ROC-AUC *within* each clinic (pooled scores reward telling the
clinics apart, which does not travel). The run's external sets (``data.external``,
ISIC 2017 by default) are scored beside each model and reported, never used to choose.

Each (split, seed) is an ordinary run folder ``<out>/<split>/seed<k>`` trained by
``python -m melanoma_tf.train --run-dir``: a finished one is never run again, a killed
one continues from its last epoch, so the command is resumable and can run in the
background. ``{split}`` in a ``--set`` value is replaced by the split a run holds out
(``distill.teacher=runs/teachers/{split}``: a teacher trained without that clinic either). ``--compare`` puts two yardsticks side by side with paired differences
(the same held-out images and seeds), bootstrapped over lesions. Writes
``yardstick.md`` / ``.json`` / ``runs.csv``; the last line printed is
``yardstick: <folder>``.
"""

from __future__ import annotations

import argparse
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
from melanoma_tf import data as datamod
from melanoma_tf import metrics as M
from melanoma_tf.cli import run_main
from melanoma_tf.errors import MelanomaTfError, TrialError
from melanoma_tf.files import write_atomic, write_json
from melanoma_tf.runs import dataset_root
from melanoma_tf.sweep_ray import run_with_ray

log = logging.getLogger("melanoma_tf.yardstick")
RANDOM = "random"  # the split name of the random lesion-grouped holdout
SPLIT_FIELD = "{split}"  # in a --set value: replaced by the split each run holds out


class YardstickError(MelanomaTfError, ValueError):
    """The yardstick cannot be planned or compared as asked; the message says why."""


@dataclass
class Plan:
    """What one yardstick trains: its config, the clinics in the mean and reported, the seeds."""

    config: Path
    overrides: list[str]
    clinics: list[str]  # held out in turn, averaged
    reported: list[str]  # held out in turn, shown but not averaged (too few melanomas)
    seeds: list[int]
    random_split: bool = True
    source_column: str = "dataset"
    melanomas: dict[str, int] = field(default_factory=dict)  # per source, among the images present

    @property
    def splits(self) -> list[str]:
        return self.clinics + ([RANDOM] if self.random_split else []) + self.reported

    def jobs(self) -> list[tuple[str, int]]:
        """Seed by seed, so that a yardstick stopped early has whole seeds to report."""
        return [(split, seed) for seed in self.seeds for split in self.splits]


def melanomas_per_source(cfg: cfgmod.Config) -> dict[str, int]:
    """Melanomas per value of ``data.source_column`` among the listed images that are present."""
    root = dataset_root(cfg)
    path = Path(cfg.data.metadata) if Path(cfg.data.metadata).is_absolute() else root / cfg.data.metadata
    metadata = datamod.read_metadata(path)
    column = cfg.data.source_column
    if column not in metadata.columns:
        raise YardstickError(f"{path}: no column {column!r} (data.source_column) naming each image's clinic; "
                             f"the columns are {sorted(metadata.columns)}")
    files = datamod.find_images(root, cfg.data.image_dirs)
    present = metadata[metadata["image_id"].isin(files)]
    counts = present[present["dx"] == datamod.MELANOMA].groupby(column).size()
    return {str(source): int(counts.get(source, 0)) for source in sorted(present[column].astype(str).unique())}


def make_plan(config: str | Path, overrides: list[str], seeds: list[int], clinics: Optional[list[str]] = None,
              reported: Optional[list[str]] = None, random_split: bool = True, min_melanomas: int = 100,
              min_reported: int = 20) -> Plan:
    """Checks the config and chooses the clinics: given ones must exist, else by their melanoma counts."""
    if not seeds:
        raise YardstickError("--seeds: at least one seed")
    if len(set(seeds)) != len(seeds):
        raise YardstickError(f"--seeds {seeds}: a seed is named twice")
    cfg = cfgmod.load(config, overrides)
    if cfg.data.holdout_source is not None:
        raise YardstickError("data.holdout_source is set in the config: the yardstick chooses the holdout itself")
    counts = melanomas_per_source(cfg)
    for name in (clinics or []) + (reported or []):
        if name not in counts:
            raise YardstickError(f"clinic {name!r} is not a value of {cfg.data.source_column!r}; "
                                 f"the sources are {sorted(counts)}")
    if clinics is None:
        clinics = [s for s, n in counts.items() if n >= min_melanomas]
    if reported is None:
        reported = [s for s, n in counts.items() if min_reported <= n < min_melanomas and s not in clinics]
    overlap = set(clinics) & set(reported)
    if overlap:
        raise YardstickError(f"{sorted(overlap)} both in the mean (--clinics) and reported only (--reported)")
    if not clinics and not random_split:
        raise YardstickError(f"no clinic has {min_melanomas} melanomas ({counts}) and --no-random: nothing to train")
    for name in clinics + reported:  # every held-out clinic must leave both classes elsewhere
        if counts[name] == sum(counts.values()):
            raise YardstickError(f"every melanoma is in {name!r}: holding it out leaves none to train on")
    return Plan(Path(config), list(overrides), list(clinics), list(reported), list(seeds), random_split,
                cfg.data.source_column, counts)


# --------------------------------------------------------------------------- training


def run_folder(root: Path, split: str, seed: int) -> Path:
    return root / split / f"seed{seed}"


def train_command(plan: Plan, root: Path, split: str, seed: int) -> list[str]:
    """The ordinary training command of one (split, seed), evaluating its holdout and external sets after."""
    command = [sys.executable, "-m", "melanoma_tf.train", "--config", str(plan.config),
               "--run-dir", str(run_folder(root, split, seed))]
    # "{split}" in a value names the held-out split: a teacher per clinic that never saw it either.
    sets = [item.replace(SPLIT_FIELD, split) for item in plan.overrides] + [f"seed={seed}", "output.evaluate=true"]
    if split != RANDOM:
        sets.append(f"data.holdout_source={split}")
    for item in sets:
        command += ["--set", item]
    return command


def holdout_metrics_path(folder: Path) -> Optional[Path]:
    """``eval_holdout/metrics.json`` of a run (its last stage for a chained run), or None before it exists."""
    found = sorted(folder.glob("eval_holdout/metrics.json")) or sorted(folder.glob("*/eval_holdout/metrics.json"))
    if not found:
        return None
    if len(found) > 1:  # a chained run: the stage the run evaluates last is the last in the config
        cfg = cfgmod.load(folder / "config.yaml")
        by_stage = {p.parent.parent.name: p for p in found}
        return next((by_stage[s] for s in reversed(cfg.stages) if s in by_stage), found[-1])
    return found[0]


def run_job(plan: Plan, root: Path, split: str, seed: int, cwd: Optional[str] = None) -> Path:
    """Trains and scores one (split, seed) unless it has finished; returns its holdout metrics.json."""
    folder = run_folder(root, split, seed)
    done = holdout_metrics_path(folder)
    if done is not None:
        return done
    folder.parent.mkdir(parents=True, exist_ok=True)
    log_path = folder.parent / f"seed{seed}.log"
    command = train_command(plan, root, split, seed)  # --run-dir continues a killed run from its last epoch
    log.info("training %s seed %d (log: %s)", split, seed, log_path)
    with open(log_path, "a") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd)
    done = holdout_metrics_path(folder)
    if result.returncode != 0 or done is None:
        raise TrialError(f"yardstick {split} seed {seed} failed (exit {result.returncode}); see {log_path}")
    return done


@dataclass
class _RaySettings:  # what melanoma_tf.sweep_ray reads of a sweep
    name: str
    workers: int
    ray: dict[str, Any]


def run_plan(plan: Plan, root: Path, workers: int = 1, backend: str = "local",
             ray: Optional[dict[str, Any]] = None) -> None:
    """Runs every (split, seed) not yet finished: local processes, or Ray Tune trials on a cluster."""
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "plan.json", {"config": plan.config.name, "set": plan.overrides, "clinics": plan.clinics,
                                    "reported": plan.reported, "seeds": plan.seeds, "random_split": plan.random_split,
                                    "source_column": plan.source_column, "melanomas_per_source": plan.melanomas})
    jobs = plan.jobs()
    cwd = str(Path.cwd())
    log.info("yardstick: %d split(s) x %d seed(s) = %d runs (%s backend)", len(plan.splits), len(plan.seeds),
             len(jobs), backend)
    if backend == "ray":
        run_with_ray(_RaySettings(root.name, workers, ray or {}), [({"split": s}, k) for s, k in jobs], root,
                     lambda trial, seed: [{"metrics": str(run_job(plan, root, trial["split"], seed, cwd))}])
    else:
        with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
            list(pool.map(lambda job: run_job(plan, root, job[0], job[1], cwd), jobs))


# --------------------------------------------------------------------------- the table


def run_rows(root: Path, plan: dict) -> pd.DataFrame:
    """One row per finished (split, seed): holdout ROC-AUC with its interval, within-clinic and external scores."""
    rows = []
    clinics = plan["clinics"] + plan["reported"]
    for split in plan["clinics"] + plan["reported"] + ([RANDOM] if plan["random_split"] else []):
        for seed in plan["seeds"]:
            path = holdout_metrics_path(run_folder(root, split, seed))
            if path is None:
                continue
            m = json.loads(path.read_text())
            row = {"split": split, "seed": seed, "in_mean": split in plan["clinics"],
                   "roc_auc": m.get("roc_auc"), "roc_auc_low": (m.get("roc_auc_ci") or [None, None])[0],
                   "roc_auc_high": (m.get("roc_auc_ci") or [None, None])[1], "pr_auc": m.get("pr_auc"),
                   "specificity": m.get("specificity"), "sensitivity": m.get("sensitivity"),
                   "ece_platt": m.get("ece_platt"), "n_images": m.get("n_images"), "n_melanoma": m.get("n_melanoma"),
                   "folder": str(path.parent.relative_to(root))}
            for name, ext in (m.get("external") or {}).items():
                row[f"{name}_roc_auc"] = ext.get("roc_auc")
                row[f"{name}_ece_platt"] = ext.get("ece_platt")
            if split == RANDOM:  # ROC-AUC inside each clinic of the pooled holdout
                for group in m.get("subgroups", []):
                    if group["attribute"] == plan["source_column"] and group["group"] in clinics:
                        row[f"within_{group['group']}"] = group["roc_auc"]
            rows.append(row)
    return pd.DataFrame(rows)


def _mean_sd(values) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if not len(v):
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v)


def summarise(rows: pd.DataFrame, plan: dict) -> dict:
    """The yardstick's numbers: per split and seed, and the summary a recipe decision is taken on.

    ``loco_mean``: for each seed, the mean held-out ROC-AUC over the clinics in the mean; then mean and
    standard deviation over seeds. ``worst_clinic``: the clinic with the lowest seed-mean ROC-AUC.
    """
    out: dict[str, Any] = {"splits": {}, "seeds": plan["seeds"], "clinics": plan["clinics"],
                           "reported": plan["reported"]}
    external = sorted({c[: -len("_roc_auc")] for c in rows.columns if c.endswith("_roc_auc") and c != "roc_auc"})
    for split, part in rows.groupby("split", sort=False):
        mean, sd, n = _mean_sd(part["roc_auc"])
        out["splits"][split] = {"roc_auc_mean": mean, "roc_auc_sd": sd, "n_seeds": n,
                                "per_seed": {int(r["seed"]): [r["roc_auc"], r["roc_auc_low"], r["roc_auc_high"]]
                                             for r in part.to_dict("records")},
                                "n_images": int(part["n_images"].iloc[0]), "n_melanoma": int(part["n_melanoma"].iloc[0])}
    loco = rows[rows["in_mean"]]
    complete = [s for s in plan["seeds"] if set(loco.loc[loco["seed"] == s, "split"]) == set(plan["clinics"])]
    per_seed = [float(loco.loc[loco["seed"] == s, "roc_auc"].mean()) for s in complete]
    mean, sd, n = _mean_sd(per_seed)
    out["loco_mean"] = {"mean": mean, "sd": sd, "n_seeds": n, "per_seed": dict(zip(complete, per_seed))}
    clinic_means = {c: out["splits"][c]["roc_auc_mean"] for c in plan["clinics"] if c in out["splits"]}
    if clinic_means:
        worst = min(clinic_means, key=clinic_means.get)
        out["worst_clinic"] = {"clinic": worst, "roc_auc_mean": clinic_means[worst]}
    random_rows = rows[rows["split"] == RANDOM]
    within = [c for c in rows.columns if c.startswith("within_")]
    if len(random_rows) and within:
        in_mean = [f"within_{c}" for c in plan["clinics"] if f"within_{c}" in within]
        per_seed_within = random_rows[in_mean].mean(axis=1).tolist() if in_mean else []
        mean_w, sd_w, n_w = _mean_sd(per_seed_within)
        out["within_clinic"] = {"mean": mean_w, "sd": sd_w, "n_seeds": n_w,
                                **{c[len("within_"):]: _mean_sd(random_rows[c])[0] for c in within}}
    models = rows[rows["split"].isin(plan["clinics"] + [RANDOM])]  # the models the summary is of
    for name in external:
        mean_e, sd_e, n_e = _mean_sd(models[f"{name}_roc_auc"])
        ece = _mean_sd(models[f"{name}_ece_platt"])[0] if f"{name}_ece_platt" in models else float("nan")
        out.setdefault("external", {})[name] = {"roc_auc_mean": mean_e, "roc_auc_sd": sd_e, "n_models": n_e,
                                                "ece_platt_mean": ece}
    return out


def _f(value, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def portable_overrides(overrides: list[str]) -> list[str]:
    """``--set`` items as a committed table may show them: no absolute path of this machine, no output folder."""
    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "output.dir":
            continue
        if value.startswith("/") or value.startswith("~"):
            value = f"<{Path(value).name}>"
        out.append(f"{key}={value}")
    return out


def write_table(root: Path, title: str) -> dict:
    """Writes ``runs.csv``, ``yardstick.json`` and ``yardstick.md`` from the finished runs; returns the summary."""
    plan = json.loads((root / "plan.json").read_text())
    plan["set"] = portable_overrides(plan["set"])
    rows = run_rows(root, plan)
    if rows.empty:
        raise YardstickError(f"{root}: no finished run to report yet")
    summary = summarise(rows, plan)
    write_atomic(root / "runs.csv", rows.to_csv(index=False))
    write_json(root / "yardstick.json", {"plan": plan, **summary})
    seeds = plan["seeds"]
    lines = [f"# Yardstick: {title}", "",
             f"Config `{plan['config']}`" + (f" with `{' '.join(plan['set'])}`" if plan["set"] else "") +
             f"; seeds {', '.join(map(str, seeds))}; clinics by `{plan['source_column']}`.", "",
             "| summary | mean | sd over seeds | seeds |", "|---|---|---|---|",
             f"| **leave-one-clinic-out mean** ({', '.join(plan['clinics'])}) | "
             f"**{_f(summary['loco_mean']['mean'])}** | {_f(summary['loco_mean']['sd'])} | "
             f"{summary['loco_mean']['n_seeds']} |"]
    if "worst_clinic" in summary:
        worst = summary["worst_clinic"]
        lines.append(f"| worst clinic ({worst['clinic']}) | {_f(worst['roc_auc_mean'])} | | |")
    if RANDOM in summary["splits"]:
        r = summary["splits"][RANDOM]
        lines.append(f"| random holdout (pooled) | {_f(r['roc_auc_mean'])} | {_f(r['roc_auc_sd'])} | {r['n_seeds']} |")
    if "within_clinic" in summary:
        w = summary["within_clinic"]
        lines.append(f"| within-clinic ROC-AUC of the random holdout (mean of {', '.join(plan['clinics'])}) | "
                     f"{_f(w['mean'])} | {_f(w['sd'])} | {w['n_seeds']} |")
    for name, ext in summary.get("external", {}).items():
        lines.append(f"| {name} (reported, never chosen on) | {_f(ext['roc_auc_mean'])} | {_f(ext['roc_auc_sd'])} | "
                     f"{ext['n_models']} models |")
        lines.append(f"| {name} ECE after each model's validation-fitted Platt calibration | "
                     f"{_f(ext['ece_platt_mean'])} | | {ext['n_models']} models |")
    lines += ["", "Held-out ROC-AUC per split and seed, with the 95% bootstrap interval of each run (lesions "
              "resampled):", "",
              "| held out | images / melanomas | " + " | ".join(f"seed {s}" for s in seeds) + " | mean +- sd |",
              "|---|---|" + "---|" * len(seeds) + "---|"]
    for split, s in summary["splits"].items():
        cells = []
        for seed in seeds:
            auc, low, high = s["per_seed"].get(seed, (None, None, None))
            cells.append("running" if auc is None else f"{_f(auc)} [{_f(low)}, {_f(high)}]")
        label = split + ("" if split in plan["clinics"] or split == RANDOM else " (reported, not in the mean)")
        lines.append(f"| {label} | {s['n_images']} / {s['n_melanoma']} | " + " | ".join(cells) +
                     f" | {_f(s['roc_auc_mean'])} +- {_f(s['roc_auc_sd'])} |")
    write_atomic(root / "yardstick.md", "\n".join(lines) + "\n")
    return summary


# --------------------------------------------------------------------------- paired comparison


def read_predictions(eval_dir: Path, external: Optional[str] = None) -> pd.DataFrame:
    """Label, lesion and probability by image of a scored holdout (``eval_dir``) or one of its external sets."""
    folder = eval_dir if external is None else eval_dir / "external" / external
    return pd.read_csv(folder / "predictions.csv").set_index("image_id")[["label", "lesion_id", "probability"]]


def _held_out_predictions(root: Path, split: str, seed: int) -> Optional[pd.DataFrame]:
    path = holdout_metrics_path(run_folder(root, split, seed))
    return None if path is None else read_predictions(path.parent)


def paired_difference(a: list[pd.DataFrame], b: list[pd.DataFrame], n_boot: int = 1000,
                      seed: int = 0) -> dict:
    """ROC-AUC of A minus B on the same images, averaged over paired seeds, with a lesion bootstrap interval.

    Args:
      a, b: per seed, predictions (index image_id; label, lesion_id, probability) of the two recipes on
        the same held-out images.

    Returns:
      ``{"difference", "low", "high", "per_seed"}``: the mean over seeds, its 95% percentile interval
      (every replicate resamples lesions once and scores all seeds on it), and each seed's own difference.
    """
    ids = a[0].index
    for frame in a + b:
        if not frame.index.sort_values().equals(ids.sort_values()):
            raise YardstickError("the two yardsticks held out different images: not a paired comparison")
    y = a[0].loc[ids, "label"].to_numpy()
    pa = np.stack([f.loc[ids, "probability"].to_numpy() for f in a])
    pb = np.stack([f.loc[ids, "probability"].to_numpy() for f in b])
    index, _ = M.bootstrap_groups(a[0].loc[ids, "lesion_id"].to_numpy())
    members = [np.flatnonzero(index == g) for g in range(index.max() + 1)]

    def diff(rows):
        return [M.roc_auc(y[rows], pa[s, rows]) - M.roc_auc(y[rows], pb[s, rows]) for s in range(len(a))]

    per_seed = diff(np.arange(len(y)))
    rng = np.random.default_rng(seed)
    values = []
    while len(values) < n_boot:
        rows = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        if 0 < y[rows].sum() < len(rows):
            values.append(float(np.mean(diff(rows))))
    low, high = np.percentile(values, [2.5, 97.5])
    return {"difference": float(np.mean(per_seed)), "low": float(low), "high": float(high),
            "per_seed": [float(d) for d in per_seed], "replicates": values}


def compare(root_a: Path, root_b: Path, out: Path, n_boot: int = 1000) -> Path:
    """Paired differences (A - B) per held-out clinic, their LOCO mean and the random holdout; writes compare.md."""
    plans = [json.loads((r / "plan.json").read_text()) for r in (root_a, root_b)]
    seeds = [s for s in plans[0]["seeds"] if s in plans[1]["seeds"]]
    splits = [s for s in plans[0]["clinics"] + plans[0]["reported"] + [RANDOM]
              if s in plans[1]["clinics"] + plans[1]["reported"] + [RANDOM]]
    results, clinic_replicates = {}, []
    for split in splits:
        pairs = [(seed, _held_out_predictions(root_a, split, seed), _held_out_predictions(root_b, split, seed))
                 for seed in seeds]
        pairs = [(s, pa, pb) for s, pa, pb in pairs if pa is not None and pb is not None]
        if not pairs:
            continue
        if split == RANDOM:  # the random holdout moves with the seed: pair each seed alone, then average
            per = [paired_difference([pa], [pb], n_boot, seed=s) for s, pa, pb in pairs]
            replicates = np.mean([p["replicates"] for p in per], axis=0)
            result = {"difference": float(np.mean([p["difference"] for p in per])),
                      "low": float(np.percentile(replicates, 2.5)), "high": float(np.percentile(replicates, 97.5)),
                      "per_seed": [p["difference"] for p in per], "replicates": replicates.tolist()}
        else:
            result = paired_difference([pa for _, pa, _ in pairs], [pb for _, _, pb in pairs], n_boot)
        result["seeds"] = [s for s, _, _ in pairs]
        results[split] = result
        if split in plans[0]["clinics"] and split in plans[1]["clinics"]:
            clinic_replicates.append(result["replicates"])
    if not results:
        raise YardstickError(f"{root_a} and {root_b} have no finished (split, seed) in common")
    lines = [f"# {root_a.name} - {root_b.name}: paired ROC-AUC differences", "",
             "Same held-out images, same seeds; mean over seeds, 95% interval from resampling lesions (each "
             "replicate scores every seed on the same resample); positive: the first is better.", "",
             "| held out | difference | 95% interval | per seed |", "|---|---|---|---|"]
    summary = {}
    if clinic_replicates:  # clinics are independent image sets: each replicate averages one draw per clinic
        loco = np.mean(clinic_replicates, axis=0)
        in_both = [s for s in results if s in plans[0]["clinics"] and s in plans[1]["clinics"]]
        summary = {"difference": float(np.mean([results[s]["difference"] for s in in_both])),
                   "low": float(np.percentile(loco, 2.5)), "high": float(np.percentile(loco, 97.5)),
                   "clinics": in_both}
        lines.append(f"| **leave-one-clinic-out mean** | **{summary['difference']:+.3f}** | "
                     f"[{summary['low']:+.3f}, {summary['high']:+.3f}] | |")
    for split, r in results.items():
        lines.append(f"| {split} | {r['difference']:+.3f} | [{r['low']:+.3f}, {r['high']:+.3f}] | "
                     + ", ".join(f"{d:+.3f}" for d in r["per_seed"]) + " |")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", {"a": root_a.name, "b": root_b.name, "loco_mean": summary,
                                      "splits": {s: {k: v for k, v in r.items() if k != "replicates"}
                                                 for s, r in results.items()}})
    write_atomic(out / "compare.md", "\n".join(lines) + "\n")
    return out / "compare.md"


# --------------------------------------------------------------------------- command


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise YardstickError(f"--seeds {text!r}: expected whole numbers separated by commas") from None


def _names(text: Optional[str]) -> Optional[list[str]]:
    return None if text is None else [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m melanoma_tf.yardstick", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="the experiment config (configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds (default 1,2,3)")
    parser.add_argument("--clinics", help="clinics averaged (default: every source with --min-melanomas)")
    parser.add_argument("--reported", help="clinics held out and shown, not averaged (default: fewer melanomas)")
    parser.add_argument("--min-melanomas", type=int, default=100)
    parser.add_argument("--min-reported", type=int, default=20)
    parser.add_argument("--no-random", action="store_true", help="no random-split holdout runs")
    parser.add_argument("--workers", type=int, default=1, help="training processes at once")
    parser.add_argument("--backend", choices=("local", "ray"), default="local")
    parser.add_argument("--ray-address", help="an existing Ray cluster (default: a local one)")
    parser.add_argument("--cpus-per-run", type=int, default=2, help="with --backend ray")
    parser.add_argument("--out", help="output folder (default runs/yardstick/<config name>)")
    parser.add_argument("--plan-only", action="store_true", help="print the runs it would train, train nothing")
    parser.add_argument("--compare", nargs=2, metavar="FOLDER", help="paired differences of two yardsticks")
    parser.add_argument("--bootstrap", type=int, default=1000, help="--compare: bootstrap replicates")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> str:
        if args.compare:
            a, b = (Path(p) for p in args.compare)
            for folder in (a, b):
                if not (folder / "plan.json").is_file():
                    raise YardstickError(f"--compare {folder}: not a yardstick folder (no plan.json)")
            return f"compare: {compare(a, b, Path(args.out) if args.out else a.parent / f'{a.name}-vs-{b.name}', args.bootstrap)}"
        if not args.config:
            raise YardstickError("--config is needed (or --compare A B)")
        plan = make_plan(args.config, args.overrides, _ints(args.seeds), _names(args.clinics), _names(args.reported),
                         not args.no_random, args.min_melanomas, args.min_reported)
        root = Path(args.out or Path("runs") / "yardstick" / Path(args.config).stem).resolve()
        if args.plan_only:
            for split, seed in plan.jobs():
                print(" ".join(train_command(plan, root, split, seed)))
            return f"yardstick: {root} (plan only: {len(plan.jobs())} runs)"
        ray = {"address": args.ray_address, "cpus_per_trial": args.cpus_per_run}
        run_plan(plan, root, args.workers, args.backend, ray)
        summary = write_table(root, Path(args.config).stem)
        print((root / "yardstick.md").read_text())
        log.info("leave-one-clinic-out mean %.3f (sd %.3f over %d seeds)", summary["loco_mean"]["mean"],
                 summary["loco_mean"]["sd"], summary["loco_mean"]["n_seeds"])
        return f"yardstick: {root}"

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())
