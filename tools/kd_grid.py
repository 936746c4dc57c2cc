"""The proposal's grid: KD temperature x alpha x loss x pooling, every point a leave-one-clinic-out yardstick.

    python tools/kd_grid.py --grid configs/kd_grid.yaml --teachers FOLDER [--out runs/kd_grid]
        [--results results/kd_grid] [--max-points N] [--plan-only]
    python tools/kd_grid.py --grid configs/kd_grid.yaml --summarise [--out runs/kd_grid]
        [--results results/kd_grid]
    python tools/kd_grid.py --grid configs/kd_grid.yaml --teachers FOLDER --quantize [POINT ...]
        [--modes fp16,int8,qat] [--out runs/kd_grid] [--results results/kd_grid]

``--teachers`` is a yardstick folder (``python -m melanoma_tf.yardstick``) holding
``<clinic>/seed<k>`` runs for every clinic of the grid: a run holding out a clinic distils
the logit mean of that clinic's teacher models, which never saw it either. The design
(``design:`` in the grid file) is a list of phases, expanded in order into points:
``reference`` (no-KD students, one per loss), ``t_alpha`` (temperature x alpha for the
losses named) and ``pooling`` (max pooling at each loss's no-KD row and at its best KD
point so far, chosen on the leave-one-clinic-out mean). Each point is a yardstick folder
``<out>/<point>``: finished runs are never trained again and a killed one continues, so the
grid resumes where it stopped. The teacher's cached logits are computed once per clinic
(``distill.teacher_cache``).

Each finished point is also kept, compactly, in ``<results>/points/<point>.npz`` (every
run's held-out and ISIC 2017 probabilities and its scalar metrics; the images of each set
listed once in ``<results>/points/sets/``), and the tables are rewritten. Committed, these
let the grid continue on another machine: points found there but not in ``--out`` are
restored into it before anything is trained or scored, so only the missing points train.

``--summarise`` scores every point trained so far: the leave-one-clinic-out mean with a
95% interval (lesions resampled in every held-out clinic, all seeds scored on each resample),
the paired difference from the no-KD row of the same loss and pooling, ISIC 2017 (the
run's external set: reported, never chosen on) with its interval; it writes ``grid.md``,
``grid.csv``, a temperature x alpha heatmap per loss and a pooling panel.

``--quantize`` is the quantization panel: every run of each named point (default: the no-KD
row of bce and the best KD point so far) converted by ``python -m melanoma_tf.quantize`` to
``--modes`` (fp16, post-training int8, QAT), each flatbuffer scored on the run's held-out clinic
and ISIC 2017 beside the run's own Keras fp32 model. A point restored from the archive has no
models; its runs are trained again (same config and seeds) in ``<out>/quant/<point>``. Each
finished point is archived in ``<results>/quant/<point>.npz`` and ``quant.md``, ``quant.csv``
and ``quantization.png`` are rewritten: per point and mode the file size, the leave-one-clinic-out
mean with its interval, the paired difference from fp32 of the same runs, and ISIC 2017.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import yaml

from melanoma_tf import metrics as M
from melanoma_tf import plots
from melanoma_tf import yardstick as Y
from melanoma_tf.cli import run_main
from melanoma_tf.errors import MelanomaTfError
from melanoma_tf.files import write_atomic, write_json
from melanoma_tf.runs import resolve_stage_dir

log = logging.getLogger("melanoma_tf.kd_grid")
PHASES = ("reference", "t_alpha", "pooling")
QUANT_MODES = ("fp16", "int8", "qat")  # the panel's conversions; "keras" is each run's own fp32 model
EXTERNAL = "isic2017"
SNIPPET = "<!-- --8<-- [{}:table] -->"
IMAGE_LIST_COLUMNS = ("image_id", "label", "lesion_id")


class GridError(MelanomaTfError, ValueError):
    """The grid file or its teachers cannot be used as asked; the message names the file and key."""


@dataclass(frozen=True)
class Point:
    """One grid point: a loss, a pooling and (for KD) a temperature and an alpha; no KD when alpha is None."""

    phase: str
    loss: str
    pooling: str = "avg"
    temperature: Optional[float] = None
    alpha: Optional[float] = None

    @property
    def kd(self) -> bool:
        return self.alpha is not None

    @property
    def name(self) -> str:
        if not self.kd:
            return f"nokd-{self.loss}-{self.pooling}"
        return f"kd-{self.loss}-T{self.temperature:g}-a{self.alpha:g}-{self.pooling}"

    @property
    def reference(self) -> "Point":
        """The no-KD point this one is compared with: same loss and pooling."""
        return Point("reference", self.loss, self.pooling)


@dataclass
class Grid:
    """A grid file: the point config, the yardstick's clinics and seeds, the axes and the design."""

    path: Path
    config: Path
    seeds: list[int]
    clinics: list[str]
    losses: dict[str, list[str]]
    temperatures: list[float]
    alphas: list[float]
    design: list[dict[str, Any]]


def load_grid(path: str | Path) -> Grid:
    """Reads and checks a grid file; every problem names the file and the key."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise GridError(f"{path}: cannot read the grid ({err})") from None
    if not isinstance(values, dict):
        raise GridError(f"{path}: the top level must be a mapping")
    need = ("config", "seeds", "clinics", "losses", "temperatures", "alphas", "design")
    missing = [k for k in need if k not in values]
    if missing:
        raise GridError(f"{path}: missing key(s) {missing}")
    unknown = sorted(set(values) - set(need))
    if unknown:
        raise GridError(f"{path}: unknown key(s) {unknown}; the keys are {list(need)}")
    config = path.parent / values["config"]
    if not config.is_file():
        raise GridError(f"{path}: config: no file {config}")
    losses = values["losses"]
    if not isinstance(losses, dict) or not all(isinstance(v, list) for v in losses.values()):
        raise GridError(f"{path}: losses: a mapping of name -> list of KEY=VALUE overrides")
    grid = Grid(path, config, [int(s) for s in values["seeds"]], [str(c) for c in values["clinics"]],
                {str(k): [str(x) for x in v] for k, v in losses.items()},
                [float(t) for t in values["temperatures"]], [float(a) for a in values["alphas"]],
                list(values["design"]))
    for i, phase in enumerate(grid.design):
        where = f"{path}: design[{i}]"
        if not isinstance(phase, dict) or phase.get("phase") not in PHASES:
            raise GridError(f"{where}: phase must be one of {list(PHASES)} (got {phase!r})")
        bad = [name for name in phase.get("losses", []) if name not in grid.losses]
        if bad:
            raise GridError(f"{where}: loss(es) {bad} are not in losses ({list(grid.losses)})")
        for key, axis in (("temperatures", grid.temperatures), ("alphas", grid.alphas)):
            outside = [v for v in phase.get(key, []) if float(v) not in axis]
            if outside:
                raise GridError(f"{where}: {key} {outside} are not on the grid's axis {axis}")
    return grid


# --------------------------------------------------------------------------- the points


def finished_loco(out: Path, point: Point, grid: Grid) -> Optional[float]:
    """The point's leave-one-clinic-out mean ROC-AUC when every (clinic, seed) has finished, else None."""
    root = out / point.name
    values = []
    for clinic in grid.clinics:
        for seed in grid.seeds:
            path = Y.holdout_metrics_path(Y.run_folder(root, clinic, seed))
            if path is None:
                return None
            values.append(json.loads(path.read_text())["roc_auc"])
    return float(np.mean(values))


def best_kd_point(out: Path, grid: Grid, loss: str) -> Optional[Point]:
    """The finished average-pooling KD point of ``loss`` with the highest leave-one-clinic-out mean."""
    scored = []
    for t in grid.temperatures:
        for a in grid.alphas:
            point = Point("t_alpha", loss, "avg", t, a)
            score = finished_loco(out, point, grid)
            if score is not None:
                scored.append((score, point))
    return max(scored, key=lambda s: s[0])[1] if scored else None


def expand(grid: Grid, out: Path) -> list[Point]:
    """The design's points in order, without repeats; the pooling phase looks at the KD points finished so far
    (max pooling at the best of them, and every max-pooling point already finished, chosen when it was the best)."""
    points: list[Point] = []
    for phase in grid.design:
        losses = phase.get("losses", list(grid.losses))
        if phase["phase"] == "reference":
            points += [Point("reference", loss) for loss in losses]
        elif phase["phase"] == "t_alpha":
            temperatures = [float(t) for t in phase.get("temperatures", grid.temperatures)]
            alphas = [float(a) for a in phase.get("alphas", grid.alphas)]
            points += [Point("t_alpha", loss, "avg", t, a) for loss in losses for t in temperatures for a in alphas]
        else:
            for loss in losses:
                points.append(Point("pooling", loss, "max"))
                # a point trained when another KD point was the best stays in the grid, scored like the rest
                points += [Point("pooling", loss, "max", t, a) for t in grid.temperatures for a in grid.alphas
                           if finished_loco(out, Point("pooling", loss, "max", t, a), grid) is not None]
                best = best_kd_point(out, grid, loss)
                if best is not None:
                    points.append(Point("pooling", loss, "max", best.temperature, best.alpha))
    seen, unique = set(), []
    for point in points:
        if point.name not in seen:
            seen.add(point.name)
            unique.append(point)
    return unique


def overrides(grid: Grid, point: Point, teachers: Path, out: Path) -> list[str]:
    """The ``--set`` items of one point's yardstick."""
    sets = list(grid.losses[point.loss]) + [f"student.pooling={point.pooling}"]
    if not point.kd:
        return ["stages=[student]"] + sets
    return ["stages=[distill]", f"distill.teacher={teachers}/{Y.SPLIT_FIELD}/seed*",
            f"distill.teacher_cache={out / 'teacher_cache'}", f"distill.temperature={point.temperature:g}",
            f"distill.alpha={point.alpha:g}"] + sets


def check_teachers(teachers: Path, grid: Grid) -> None:
    """Every clinic of the grid has at least one finished teacher model, trained without that clinic."""
    for clinic in grid.clinics:
        found = sorted((teachers / clinic).glob("seed*/model.keras"))
        if not found:
            raise GridError(f"--teachers {teachers}: no {clinic}/seed*/model.keras (a yardstick holding out "
                            f"{clinic}, e.g. python -m melanoma_tf.yardstick --clinics {','.join(grid.clinics)})")
        for model in found:
            config = yaml.safe_load((model.parent / "config.yaml").read_text()) or {}
            held_out = (config.get("data") or {}).get("holdout_source")
            if held_out != clinic:
                raise GridError(f"{model.parent}: trained with data.holdout_source={held_out!r}, not {clinic!r}: "
                                "it may have seen the clinic its students are scored on")


def run_grid(grid: Grid, teachers: Path, out: Path, max_points: Optional[int] = None, workers: int = 1,
             results: Optional[Path] = None, n_boot: int = 500) -> list[Point]:
    """Trains the design's points in order (each a yardstick; finished runs skipped); returns those run.

    With ``results``, points archived there are restored first and never trained again; each point
    that finishes is archived and the tables rewritten.
    """
    check_teachers(teachers, grid)
    archive = results / "points" if results else None
    if archive:
        restore_points(grid, out, archive)
    done: list[Point] = []
    while max_points is None or len(done) < max_points:
        pending = [p for p in expand(grid, out) if p.name not in {d.name for d in done}
                   and not (archive and (archive / f"{p.name}.npz").is_file())]
        if not pending:
            break
        point = pending[0]
        log.info("grid point %s (%s): %d point(s) left in the design", point.name, point.phase, len(pending))
        plan = Y.make_plan(grid.config, overrides(grid, point, teachers, out), grid.seeds, grid.clinics, [],
                           random_split=False)
        Y.run_plan(plan, out / point.name, workers)
        Y.write_table(out / point.name, point.name)
        write_json(out / point.name / "point.json", {"phase": point.phase, "loss": point.loss,
                                                     "pooling": point.pooling, "temperature": point.temperature,
                                                     "alpha": point.alpha, "teachers": teachers.name})
        if archive:
            archive_point(out, point, grid, archive)
            write_results(grid, out, results, n_boot)
        done.append(point)
    return done


# --------------------------------------------------------------------------- archive (the grid across machines)


def _archived_sets(folder: Path, clinic: str) -> list[tuple[str, str, Path]]:
    """(name in the archive, name of its image list, predictions file) of one finished run's scored sets."""
    return [("holdout", clinic, folder / "predictions.csv"),
            (EXTERNAL, EXTERNAL, folder / "external" / EXTERNAL / "predictions.csv")]


def read_image_list(archive: Path, name: str, user: Optional[Path] = None) -> pd.DataFrame:
    """``archive/sets/<name>.csv``: the images (id, label, lesion) whose probabilities the archives hold, in order.

    Raises:
      GridError: naming the list (and ``user``, the archive that needs it) when it is absent, unreadable or
        lacks one of the columns image_id, label, lesion_id.
    """
    path = archive / "sets" / f"{name}.csv"
    needed_by = f" (needed by {user.name})" if user is not None else ""
    try:
        listed = pd.read_csv(path, dtype={"image_id": str, "lesion_id": str})
    except (OSError, ValueError) as err:
        raise GridError(f"{path}: cannot read the image list{needed_by} ({err})") from None
    missing = [c for c in IMAGE_LIST_COLUMNS if c not in listed.columns]
    if missing:
        raise GridError(f"{path}: missing column(s) {missing}{needed_by}; an image list has "
                        f"{', '.join(IMAGE_LIST_COLUMNS)}")
    return listed


def _image_list(archive: Path, name: str, frame: pd.DataFrame) -> pd.DataFrame:
    """The archive's list of ``name``'s images (written by the first run archived); ``frame`` must hold the same."""
    path = archive / "sets" / f"{name}.csv"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, frame[list(IMAGE_LIST_COLUMNS)].to_csv(index=False))
    listed = read_image_list(archive, name)
    if set(listed["image_id"]) != set(frame["image_id"].astype(str)):
        raise GridError(f"{path}: lists other images than the run being archived ({len(listed)} vs {len(frame)}): "
                        "a grid of another data set or split belongs in another --results folder")
    return listed


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def archive_point(out: Path, point: Point, grid: Grid, archive: Path) -> Path:
    """``<archive>/<point>.npz``: every run's probabilities per scored set (in the image lists' order), metrics."""
    root = out / point.name
    arrays: dict[str, np.ndarray] = {}
    metrics: dict[str, dict] = {}
    for clinic in grid.clinics:
        for seed in grid.seeds:
            path = Y.holdout_metrics_path(Y.run_folder(root, clinic, seed))
            if path is None:
                raise GridError(f"{root}: {clinic}/seed{seed} has not finished; the point cannot be archived")
            for name, values in _set_probabilities(path.parent, clinic, archive).items():
                arrays[f"{clinic}/seed{seed}/{name}"] = values
            values = json.loads(path.read_text())
            metrics[f"{clinic}/seed{seed}"] = {k: v for k, v in values.items() if _number(v) or (
                isinstance(v, list) and v and all(_number(x) for x in v))}
    return _save_npz(archive / f"{point.name}.npz", arrays, metrics=metrics)


def _set_probabilities(eval_dir: Path, clinic: str, archive: Path) -> dict[str, np.ndarray]:
    """Each scored set of one evaluation folder: its probabilities in the order of the archive's image list."""
    found = {}
    for name, listing, file in _archived_sets(eval_dir, clinic):
        if file.is_file():
            frame = pd.read_csv(file, dtype={"image_id": str, "lesion_id": str})
            order = _image_list(archive, listing, frame)["image_id"]
            found[name] = frame.set_index("image_id").loc[order, "probability"].to_numpy(np.float32)
    return found


def _save_npz(target: Path, arrays: dict[str, np.ndarray], **records) -> Path:
    """``target`` written atomically: the arrays, and each record as JSON text."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.stem}.tmp.npz"
    np.savez_compressed(tmp, **{k: np.array(json.dumps(v, sort_keys=True)) for k, v in records.items()}, **arrays)
    tmp.replace(target)
    return target


def restore_points(grid: Grid, out: Path, archive: Path) -> list[str]:
    """Points archived in ``archive`` but absent from ``out`` written back as finished runs; returns their names."""
    restored = []
    for file in sorted(archive.glob("*.npz")):
        root = out / file.stem
        if (root / "plan.json").is_file():
            continue  # this machine's own runs of the point
        try:
            with np.load(file, allow_pickle=False) as saved:
                metrics = json.loads(str(saved["metrics"]))
                arrays = {key: saved[key] for key in saved.files if key != "metrics"}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise GridError(f"{file}: not a grid point archive ({err}); delete it to train the point again") from None
        for run, values in metrics.items():
            clinic, _, seed = run.rpartition("/seed")
            if not clinic or not seed.isdigit():
                raise GridError(f"{file}: run {run!r} is not <clinic>/seed<k>; delete the file to train the point "
                                "again")
            folder = Y.run_folder(root, clinic, int(seed)) / "eval_holdout"
            for name, listing, target in _archived_sets(folder, clinic):
                if f"{run}/{name}" not in arrays:
                    continue
                images = read_image_list(archive, listing, file)
                probabilities = arrays[f"{run}/{name}"]
                if len(probabilities) != len(images):
                    raise GridError(f"{file}: {run}/{name} has {len(probabilities)} values for the "
                                    f"{len(images)} images of sets/{listing}.csv")
                target.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(target, images.assign(probability=probabilities).to_csv(index=False))
            write_json(folder / "metrics.json", {**values, "restored_from": f"{archive.name}/{file.name}"})
        write_json(root / "plan.json", {"clinics": grid.clinics, "reported": [], "seeds": grid.seeds,
                                        "random_split": False, "restored_from": f"{archive.name}/{file.name}"})
        restored.append(file.stem)
    if restored:
        log.info("restored %d finished point(s) from %s: %s", len(restored), archive, ", ".join(restored))
    return restored


# --------------------------------------------------------------------------- scoring


def _predictions(root: Path, clinic: str, seeds: list[int], external: Optional[str] = None) -> list[pd.DataFrame]:
    frames = []
    for seed in seeds:
        path = Y.holdout_metrics_path(Y.run_folder(root, clinic, seed))
        if path is None:
            continue
        file = path.parent / ("predictions.csv" if external is None else f"external/{external}/predictions.csv")
        if file.is_file():
            frames.append(Y.read_predictions(path.parent, external))
    return frames


def mean_auc_interval(groups: list[list[pd.DataFrame]], n_boot: int = 500, seed: int = 0,
                      against: Optional[list[list[pd.DataFrame]]] = None) -> dict:
    """Mean ROC-AUC over groups (clinics) of the mean over their models (seeds), with a 95% lesion bootstrap.

    Each replicate resamples the lesions of every group once and scores all of its models on that resample.
    ``against``: the same groups of other models on the same images; then the mean and its interval are of
    the paired difference (these models' ROC-AUC minus those's).
    """
    prepared = []
    for k, frames in enumerate(groups):
        ids = frames[0].index
        others = against[k] if against is not None else []
        if any(not f.index.sort_values().equals(ids.sort_values()) for f in frames + others):
            raise GridError("the models of one held-out set scored different images: their mean is not paired")
        y = frames[0].loc[ids, "label"].to_numpy()
        p = np.stack([f.loc[ids, "probability"].to_numpy() for f in frames])
        q = np.stack([f.loc[ids, "probability"].to_numpy() for f in others]) if others else None
        lesions = frames[0].loc[ids, "lesion_id"].to_numpy()
        members = [np.flatnonzero(lesions == lesion) for lesion in pd.unique(lesions)]
        prepared.append((y, p, q, members))

    def score(y, p, q, rows):
        value = np.mean([M.roc_auc(y[rows], row[rows]) for row in p])
        return value - np.mean([M.roc_auc(y[rows], row[rows]) for row in q]) if q is not None else value

    point = float(np.mean([score(y, p, q, np.arange(len(y))) for y, p, q, _ in prepared]))
    rng = np.random.default_rng(seed)
    replicates = []
    for _ in range(n_boot):
        values = []
        for y, p, q, members in prepared:
            rows = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
            values.append(score(y, p, q, rows) if 0 < y[rows].sum() < len(rows) else np.nan)
        replicates.append(np.mean(values))
    low, high = np.nanpercentile(replicates, [2.5, 97.5])
    return {"mean": point, "low": float(low), "high": float(high)}


def score_point(out: Path, point: Point, grid: Grid, n_boot: int) -> Optional[dict]:
    """A point's row: runs finished, LOCO mean and interval, per clinic, ISIC 2017, paired difference from no KD."""
    root = out / point.name
    groups = {c: _predictions(root, c, grid.seeds) for c in grid.clinics}
    if not all(groups.values()):
        return None
    row: dict[str, Any] = {"point": point.name, "phase": point.phase, "loss": point.loss, "pooling": point.pooling,
                           "temperature": point.temperature, "alpha": point.alpha,
                           "runs": sum(len(v) for v in groups.values())}
    loco = mean_auc_interval(list(groups.values()), n_boot)
    row.update(loco_mean=loco["mean"], loco_low=loco["low"], loco_high=loco["high"])
    for clinic, frames in groups.items():
        row[clinic] = float(np.mean([M.roc_auc(f["label"].to_numpy(), f["probability"].to_numpy()) for f in frames]))
    external = [f for c in grid.clinics for f in _predictions(root, c, grid.seeds, EXTERNAL)]
    if external:
        ext = mean_auc_interval([external], n_boot)
        row.update({f"{EXTERNAL}_mean": ext["mean"], f"{EXTERNAL}_low": ext["low"], f"{EXTERNAL}_high": ext["high"]})
    if point.kd:
        row.update(_paired_with(root, out / point.reference.name, "vs_nokd", n_boot))
    if point.pooling == "max":  # the same point with average pooling
        row.update(_paired_with(root, out / Point("t_alpha", point.loss, "avg", point.temperature, point.alpha).name,
                                "vs_avg", n_boot))
    return row


def _paired_with(root: Path, other: Path, key: str, n_boot: int) -> dict:
    """``{key, key_low, key_high}``: the paired LOCO difference of the point at ``root`` from ``other`` (the yardstick
    comparison, written in ``root/key``); nothing when ``other`` has not been trained or cannot be paired."""
    if not (other / "plan.json").is_file():
        return {}
    try:
        Y.compare(root, other, root / key, n_boot)
    except Y.YardstickError as err:
        log.warning("%s: no paired comparison with %s (%s)", root.name, other.name, err)
        return {}
    paired = json.loads((root / key / "compare.json").read_text())["loco_mean"]
    return {key: paired.get("difference"), f"{key}_low": paired.get("low"), f"{key}_high": paired.get("high")}


def score_grid(grid: Grid, out: Path, n_boot: int = 500) -> pd.DataFrame:
    """Rows of every point of the design (pooling's as chosen so far) that has all its runs finished."""
    rows = [score_point(out, point, grid, n_boot) for point in expand(grid, out)]
    return pd.DataFrame([r for r in rows if r is not None])


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None or not np.isfinite(value):
        return ""
    return f"{value:.3f} [{row[f'{key[:-5]}_low']:.3f}, {row[f'{key[:-5]}_high']:.3f}]"


def _paired(row: dict, key: str = "vs_nokd") -> str:
    value = row.get(key)
    if value is None or not np.isfinite(value):
        return ""
    return f"{value:+.3f} [{row[f'{key}_low']:+.3f}, {row[f'{key}_high']:+.3f}]"


def heatmaps(table: pd.DataFrame, grid: Grid, folder: Path) -> list[str]:
    """Temperature x alpha per loss: the paired LOCO difference from no KD (the cell's mean LOCO when unpaired)."""
    written = []
    for loss in grid.losses:
        part = table[(table["loss"] == loss) & (table["pooling"] == "avg") & table["alpha"].notna()]
        if part.empty:
            continue
        values = np.full((len(grid.temperatures), len(grid.alphas)), np.nan)
        labels = [["" for _ in grid.alphas] for _ in grid.temperatures]
        for row in part.to_dict("records"):
            i, j = grid.temperatures.index(row["temperature"]), grid.alphas.index(row["alpha"])
            values[i, j] = row.get("vs_nokd", np.nan)
            labels[i][j] = f"{row['loco_mean']:.3f}\n{_paired(row).split(' [')[0]}"
        written.append(plots.heatmap_plot(
            folder / f"t_alpha_{loss}.png", values, [f"T={t:g}" for t in grid.temperatures], list(grid.alphas),
            labels, "alpha (weight of the label loss; 1 - alpha on the teacher)", "temperature",
            f"{loss}: LOCO ROC-AUC (top) and paired difference from no KD (colour)", centre=0.0))
    return written


def pooling_panel(table: pd.DataFrame, folder: Path) -> Optional[str]:
    """Average vs max pooling, for each loss's no-KD row and its best KD point."""
    groups: dict[str, dict[str, tuple[float, float, float]]] = {}
    for row in table[table["phase"] == "pooling"].to_dict("records"):
        twin = table[(table["loss"] == row["loss"]) & (table["pooling"] == "avg")
                     & (table["temperature"].fillna(-1) == (row["temperature"] if row["alpha"] is not None
                                                             and np.isfinite(row["alpha"]) else -1))
                     & (table["alpha"].fillna(-1) == (row["alpha"] if row["alpha"] is not None
                                                       and np.isfinite(row["alpha"]) else -1))]
        if twin.empty:
            continue
        label = f"{row['loss']} no KD" if not np.isfinite(row["alpha"]) else \
            f"{row['loss']} T={row['temperature']:g} a={row['alpha']:g}"
        avg = twin.iloc[0]
        groups[label] = {"avg": (avg["loco_mean"], avg["loco_low"], avg["loco_high"]),
                         "max": (row["loco_mean"], row["loco_low"], row["loco_high"])}
    if not groups:
        return None
    return plots.interval_panel(folder / "pooling.png", groups, "leave-one-clinic-out ROC-AUC",
                                "global average vs max pooling")


def write_results(grid: Grid, out: Path, folder: Path, n_boot: int = 500) -> Path:
    """grid.md, grid.csv, the heatmaps and the pooling panel of everything finished so far."""
    table = score_grid(grid, out, n_boot)
    folder.mkdir(parents=True, exist_ok=True)
    planned = expand(grid, out)
    lines = [f"# KD grid ({grid.path.name}): {len(table)} of {len(planned)} planned points finished", "",
             f"Each point: `{grid.config.name}` trained with {', '.join(grid.clinics)} held out in turn, seeds "
             f"{', '.join(map(str, grid.seeds))}; the teacher of each run never saw its held-out clinic. "
             "LOCO: mean held-out ROC-AUC over clinics and seeds, 95% interval resampling lesions; "
             "vs no KD: paired difference from the no-KD row of the same loss and pooling (same images, seeds); "
             "max vs avg: paired difference of a max-pooling point from the same point with average pooling; "
             f"{EXTERNAL}: mean over the same models, reported, never chosen on.", "",
             SNIPPET.format("start"),  # the table alone, for a documentation page (pymdownx.snippets)
             "| point | phase | LOCO ROC-AUC | vs no KD | max vs avg | " + " | ".join(grid.clinics)
             + f" | {EXTERNAL} |", "|---|---|---|---|---|" + "---|" * len(grid.clinics) + "---|"]
    if not table.empty:
        for row in table.to_dict("records"):
            lines.append(f"| {row['point']} | {row['phase']} | {_cell(row, 'loco_mean')} | {_paired(row)} | "
                         f"{_paired(row, 'vs_avg')} | " + " | ".join(f"{row[c]:.3f}" for c in grid.clinics)
                         + f" | {_cell(row, f'{EXTERNAL}_mean')} |")
    waiting = [p.name for p in planned if table.empty or p.name not in set(table["point"])]
    if waiting:
        lines += ["", f"Not finished yet ({len(waiting)}): " + ", ".join(waiting)]
    lines.append(SNIPPET.format("end"))
    figures = heatmaps(table, grid, folder) if not table.empty else []
    panel = pooling_panel(table, folder) if not table.empty else None
    lines += [""] + [f"![{name}]({name})" for name in figures + ([panel] if panel else [])]
    write_atomic(folder / "grid.md", "\n".join(lines) + "\n")
    write_atomic(folder / "grid.csv", table.to_csv(index=False))
    return folder / "grid.md"


# --------------------------------------------------------------------------- quantization panel


def default_quant_points(grid: Grid, out: Path) -> list[str]:
    """The no-KD row of the design's first loss and its best finished KD point (average pooling)."""
    loss = next(iter(grid.losses))
    best = best_kd_point(out, grid, loss)
    return [Point("reference", loss).name] + ([best.name] if best is not None else [])


def _point_named(grid: Grid, out: Path, name: str) -> Point:
    for point in expand(grid, out):
        if point.name == name:
            return point
    raise GridError(f"--quantize {name}: not a point of {grid.path.name} (python tools/kd_grid.py --plan-only "
                    "lists them)")


def _stage_dir(run: Path) -> Path:
    return resolve_stage_dir(run)


def quant_eval_dir(run: Path, mode: str) -> Path:
    """Where ``python -m melanoma_tf.quantize`` scores ``mode`` (``keras``: the run's own fp32 model)."""
    return _stage_dir(run) / "tflite" / f"eval_{mode}"


def _has_models(root: Path, grid: Grid) -> bool:
    runs = [Y.run_folder(root, c, s) for c in grid.clinics for s in grid.seeds]
    return all((r / "config.yaml").is_file() and Y.holdout_metrics_path(r) is not None
               and (_stage_dir(r) / "model.keras").is_file() for r in runs)


def quantize_point(grid: Grid, point: Point, teachers: Path, out: Path, modes: tuple[str, ...],
                   workers: int = 1) -> Path:
    """Every run of ``point`` converted to ``modes`` and scored (finished conversions kept); returns the root."""
    root = out / point.name
    if not _has_models(root, grid):  # restored from the archive, or never trained here
        root = out / "quant" / point.name
        check_teachers(teachers, grid)
        plan = Y.make_plan(grid.config, overrides(grid, point, teachers, out), grid.seeds, grid.clinics, [],
                           random_split=False)
        Y.run_plan(plan, root, workers)
    for clinic in grid.clinics:
        for seed in grid.seeds:
            convert_run(Y.run_folder(root, clinic, seed), modes)
    return root


def convert_run(run: Path, modes: tuple[str, ...]) -> None:
    """``python -m melanoma_tf.quantize`` of ``run`` to the ``modes`` not scored yet (its log: ``quantize.log``).

    Raises:
      GridError: naming the run and its log when the conversion fails.
    """
    todo = [m for m in modes if not (quant_eval_dir(run, m) / "metrics.json").is_file()]
    if not todo and (quant_eval_dir(run, "keras") / "metrics.json").is_file():
        return
    log.info("quantizing %s: %s", run, ",".join(todo or modes))
    command = [sys.executable, "-m", "melanoma_tf.quantize", "--run", str(run), "--modes", ",".join(todo or modes),
               "--latency-runs", "5"]
    with open(run / "quantize.log", "a") as log_file:
        result = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise GridError(f"{run}: quantize failed (exit {result.returncode}); see {run / 'quantize.log'}")


def archive_quant(root: Path, point: Point, grid: Grid, modes: tuple[str, ...], archive: Path) -> Path:
    """``<archive>/quant/<point>.npz``: per run and mode (``keras`` and ``modes``) the probabilities of each scored
    set, in the order of the grid archive's image lists, and each flatbuffer's size."""
    arrays: dict[str, np.ndarray] = {}
    sizes: dict[str, int] = {}
    for clinic in grid.clinics:
        for seed in grid.seeds:
            run = Y.run_folder(root, clinic, seed)
            for mode in ("keras", *modes):
                folder = quant_eval_dir(run, mode)
                if not (folder / "metrics.json").is_file():
                    raise GridError(f"{folder}: not scored yet; the quantization of {point.name} cannot be archived")
                for name, values in _set_probabilities(folder, clinic, archive).items():
                    arrays[f"{clinic}/seed{seed}/{mode}/{name}"] = values
                flatbuffer = _stage_dir(run) / "tflite" / f"{mode}.tflite"
                if flatbuffer.is_file():
                    sizes[f"{clinic}/seed{seed}/{mode}"] = flatbuffer.stat().st_size
    return _save_npz(archive / "quant" / f"{point.name}.npz", arrays, sizes=sizes, modes=["keras", *modes])


def _read_quant(file: Path, archive: Path) -> tuple[list[str], dict, dict[str, pd.DataFrame]]:
    """(modes, sizes, frames by '<clinic>/seed<k>/<mode>/<set>') of one archived quantization."""
    try:
        with np.load(file, allow_pickle=False) as saved:
            modes, sizes = json.loads(str(saved["modes"])), json.loads(str(saved["sizes"]))
            arrays = {key: saved[key] for key in saved.files if key not in ("modes", "sizes")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise GridError(f"{file}: not a quantization archive ({err}); delete it to quantize the point again") \
            from None
    frames = {}
    for key, probabilities in arrays.items():
        parts = key.split("/")
        if len(parts) != 4 or not parts[1].startswith("seed"):
            raise GridError(f"{file}: entry {key!r} is not <clinic>/seed<k>/<mode>/<set>; delete the file to "
                            "quantize the point again")
        clinic, _, _, name = parts
        images = read_image_list(archive, clinic if name == "holdout" else name, file)
        if len(images) != len(probabilities):
            raise GridError(f"{file}: {key} has {len(probabilities)} values for the {len(images)} images listed")
        frames[key] = images.assign(probability=probabilities).set_index("image_id")
    return modes, sizes, frames


def score_quant(grid: Grid, archive: Path, n_boot: int = 500) -> pd.DataFrame:
    """One row per archived point and mode: size, LOCO mean, paired difference from fp32, ISIC 2017."""
    rows = []
    for file in sorted((archive / "quant").glob("*.npz")):
        modes, sizes, frames = _read_quant(file, archive)

        def groups(mode: str, name: str) -> list[list[pd.DataFrame]]:
            """Held-out clinics: one group each (their mean is the LOCO mean); an external set: one group."""
            keys = [[f"{c}/seed{s}/{mode}/{name}" for s in grid.seeds] for c in grid.clinics]
            if name != "holdout":
                keys = [[k for group in keys for k in group]]
            return [[frames[k] for k in group if k in frames] for group in keys]

        for mode in modes:
            row: dict[str, Any] = {"point": file.stem, "mode": mode}
            runs = [v for k, v in sizes.items() if k.endswith(f"/{mode}")]
            row["size_mb"] = float(np.mean(runs)) / 1e6 if runs else np.nan
            for name, prefix in (("holdout", "loco"), (EXTERNAL, EXTERNAL)):
                found = groups(mode, name)
                if not all(found):
                    continue
                value = mean_auc_interval(found, n_boot)
                row.update({f"{prefix}_mean": value["mean"], f"{prefix}_low": value["low"],
                            f"{prefix}_high": value["high"]})
                if mode != "keras":
                    paired = mean_auc_interval(found, n_boot, against=groups("keras", name))
                    row.update({f"{prefix}_vs_fp32": paired["mean"], f"{prefix}_vs_fp32_low": paired["low"],
                                f"{prefix}_vs_fp32_high": paired["high"]})
            rows.append(row)
    return pd.DataFrame(rows)


MODE_LABELS = {"keras": "fp32 (Keras)", "fp16": "fp16", "int8": "int8 PTQ", "qat": "int8 QAT"}


def write_quant_results(grid: Grid, results: Path, n_boot: int = 500) -> Path:
    """quant.md, quant.csv and quantization.png of every archived quantization."""
    table = score_quant(grid, results / "points", n_boot)
    lines = ["# Quantization panel of the KD grid", "",
             f"Every run of each point ({', '.join(grid.clinics)} held out in turn, seeds "
             f"{', '.join(map(str, grid.seeds))}) converted by `python -m melanoma_tf.quantize` and scored on its "
             "held-out clinic and ISIC 2017. LOCO: mean held-out ROC-AUC over clinics and seeds with a 95% interval "
             "(lesions resampled); vs fp32: paired difference from the same runs' Keras fp32 model. "
             f"{EXTERNAL}: reported, never chosen on. Size: the flatbuffer, mean over runs.", "",
             SNIPPET.format("start"),
             f"| point | model | size MB | LOCO ROC-AUC | vs fp32 | {EXTERNAL} | vs fp32 ({EXTERNAL}) |",
             "|---|---|---|---|---|---|---|"]
    groups: dict[str, dict[str, tuple[float, float, float]]] = {}
    for row in table.to_dict("records"):
        size = f"{row['size_mb']:.2f}" if np.isfinite(row["size_mb"]) else ""
        lines.append(f"| {row['point']} | {MODE_LABELS.get(row['mode'], row['mode'])} | {size} | "
                     f"{_cell(row, 'loco_mean')} | {_paired(row, 'loco_vs_fp32')} | {_cell(row, f'{EXTERNAL}_mean')}"
                     f" | {_paired(row, f'{EXTERNAL}_vs_fp32')} |")
        if np.isfinite(row.get("loco_mean", np.nan)):
            groups.setdefault(row["point"], {})[MODE_LABELS.get(row["mode"], row["mode"])] = (
                row["loco_mean"], row["loco_low"], row["loco_high"])
    lines.append(SNIPPET.format("end"))
    if groups:
        figure = plots.interval_panel(results / "quantization.png", groups, "leave-one-clinic-out ROC-AUC",
                                      "fp32 vs fp16 vs int8 (post-training, QAT)", order=list(MODE_LABELS.values()))
        lines += ["", f"![{figure}]({figure})"]
    results.mkdir(parents=True, exist_ok=True)
    write_atomic(results / "quant.md", "\n".join(lines) + "\n")
    write_atomic(results / "quant.csv", table.to_csv(index=False))
    return results / "quant.md"


def run_quant_panel(grid: Grid, teachers: Path, out: Path, names: list[str], modes: tuple[str, ...],
                    results: Path, n_boot: int = 500, workers: int = 1) -> Path:
    """Quantizes and archives each named point not archived yet; rewrites the panel."""
    unknown = [m for m in modes if m not in QUANT_MODES]
    if unknown or not modes:
        raise GridError(f"--modes {','.join(modes)}: choose from {','.join(QUANT_MODES)}")
    archive = results / "points"
    restore_points(grid, out, archive)
    points = [_point_named(grid, out, name) for name in names or default_quant_points(grid, out)]
    for point in points:
        done = archive / "quant" / f"{point.name}.npz"
        if done.is_file() and set(json.loads(str(np.load(done)["modes"]))) >= set(modes):
            log.info("%s: quantization archived already (%s)", point.name, done)
            continue
        root = quantize_point(grid, point, teachers, out, modes, workers)
        archive_quant(root, point, grid, modes, archive)
        write_quant_results(grid, results, n_boot)
    return write_quant_results(grid, results, n_boot)


# --------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python tools/kd_grid.py", description=__doc__.split("\n")[0])
    parser.add_argument("--grid", required=True, help="the grid file (configs/kd_grid.yaml)")
    parser.add_argument("--teachers", help="a yardstick folder with <clinic>/seed<k> teacher runs")
    parser.add_argument("--out", default="runs/kd_grid", help="where the points' yardsticks go")
    parser.add_argument("--max-points", type=int, help="stop after this many points (resume later)")
    parser.add_argument("--workers", type=int, default=1, help="training processes at once")
    parser.add_argument("--plan-only", action="store_true", help="list the points in order, train nothing")
    parser.add_argument("--summarise", action="store_true", help="score the finished points, train nothing")
    parser.add_argument("--results", default="results/kd_grid",
                        help="the tables and the finished points' archive (points/); restored from when training")
    parser.add_argument("--bootstrap", type=int, default=500, help="bootstrap replicates of each interval")
    parser.add_argument("--quantize", nargs="*", metavar="POINT",
                        help="the quantization panel of these points (default: bce's no-KD row and best KD point)")
    parser.add_argument("--modes", default=",".join(QUANT_MODES), help="--quantize: conversions (fp16,int8,qat)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> str:
        grid, out = load_grid(args.grid), Path(args.out).resolve()
        if args.plan_only:
            restore_points(grid, out, Path(args.results) / "points")
            for point in expand(grid, out):
                state = "finished" if finished_loco(out, point, grid) is not None else "to train"
                print(f"{point.name}\t{point.phase}\t{state}")
            return f"grid: {out} (plan only)"
        if args.summarise:
            restore_points(grid, out, Path(args.results) / "points")
            written = write_results(grid, out, Path(args.results), args.bootstrap)
            if list((Path(args.results) / "points" / "quant").glob("*.npz")):
                write_quant_results(grid, Path(args.results), args.bootstrap)
            return f"grid results: {written}"
        if not args.teachers:
            raise GridError("--teachers FOLDER is needed to train (or --plan-only / --summarise)")
        if args.quantize is not None:
            modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
            panel = run_quant_panel(grid, Path(args.teachers).resolve(), out, args.quantize, modes,
                                    Path(args.results), args.bootstrap, args.workers)
            return f"quantization panel: {panel}"
        done = run_grid(grid, Path(args.teachers).resolve(), out, args.max_points, args.workers,
                        Path(args.results), args.bootstrap)
        return f"grid: {out} ({len(done)} point(s) run)"

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())
