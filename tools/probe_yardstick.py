"""A frozen pretrained trunk with a logistic-regression head, scored on the multi-clinic yardstick.

    python tools/probe_yardstick.py --config configs/teacher_resnet152_resmem.yaml [--out runs/probe/resnet152]
        [--clinics rosendahl,vidir_modern] [--reported vienna_dias] [--ensemble-with YARDSTICK] [--weight 0.25]
        [--results results/probe_resnet152] [--set key=value ...]

The config's teacher (``teacher.arch``, ``teacher.weights``, its image size) is built once;
its pooled features of every image the run can use, and of the external sets, are extracted
once into ``<out>/features/`` (in chunks: a killed extraction continues). For each clinic held
out (``data.holdout_source``, the same split as the yardstick's runs), a logistic regression
is fitted on the training split's features, its C chosen on validation ROC-AUC; the head is
written into the teacher model (``<out>/<clinic>/seed1/model.keras``, usable as a
distillation teacher or by ``tools/kd_grid.py --teachers``) and the holdout and external
sets are scored as every run is (``eval_holdout/``). ``yardstick.md`` summarises them.

``--ensemble-with`` a student yardstick: each held-out clinic is also scored by the mean of
the students' standardised logits and the probe's, weighted ``--weight`` (fixed beforehand,
not tuned); ``ensemble.md`` compares it with the students' own logit mean. The last line
printed is ``probe: <folder>``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from melanoma_tf import config as cfgmod
from melanoma_tf import evaluation as E
from melanoma_tf import metrics as M
from melanoma_tf import models, runs
from melanoma_tf import yardstick as Y
from melanoma_tf.backend import keras, set_global_seed
from melanoma_tf.cli import run_main
from melanoma_tf.errors import MelanomaTfError
from melanoma_tf.files import write_atomic, write_json
from melanoma_tf.finetune import C_GRID, fit_linear_head
from melanoma_tf.pipeline import DECODING, make_dataset

log = logging.getLogger("melanoma_tf.probe")
CHUNK = 256  # images per saved feature file


class ProbeError(MelanomaTfError, ValueError):
    """The probe cannot run as asked; the message names the file or option."""


def extract(features_model, frame: pd.DataFrame, size: int, folder: Path, name: str) -> np.ndarray:
    """Pooled features of ``frame``'s images in order, computed in chunks saved to ``folder`` (reused on resume)."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for start in range(0, len(frame), CHUNK):
        chunk = frame.iloc[start:start + CHUNK]
        path = folder / f"{name}_{start // CHUNK:05d}.npz"
        if path.is_file():
            try:
                saved = np.load(path, allow_pickle=False)
                if list(saved["image_id"]) == chunk["image_id"].tolist():
                    parts.append(saved["features"])
                    continue
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
                log.warning("%s: unreadable saved features (%s); extracting them again", path, err)
        began = time.time()
        ds = make_dataset(chunk["path"].tolist(), np.zeros(len(chunk), np.float32), size, 32, binary=True,
                          cache="none").map(lambda x, y, w: x)
        values = features_model.predict(ds, verbose=0).astype(np.float32)
        tmp = folder / f".{path.stem}.tmp.npz"
        np.savez(tmp, image_id=np.array(chunk["image_id"].tolist()), features=values)
        tmp.replace(path)
        log.info("%s: features of images %d-%d of %d in %.0fs", name, start, start + len(chunk), len(frame),
                 time.time() - began)
        parts.append(values)
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def score(folder: Path, val_y, val_z, test: pd.DataFrame, test_z, source_column: str) -> dict:
    """metrics.json and predictions.csv of one scored set, as the evaluation of every run writes them."""
    result = E.binary_report(val_y, val_z, test["label"].to_numpy(), test_z, test["lesion_id"].to_numpy())
    folder.mkdir(parents=True, exist_ok=True)
    E.write_scored_split(folder, test, np.asarray(test_z), test["label"].to_numpy(), result, source_column)
    write_json(folder / "metrics.json", result)
    return result


def probe_split(cfg, clinic: str, features: dict[str, np.ndarray], model, external: dict, out: Path) -> dict:
    """Fits the head for one held-out clinic, writes its teacher model and its scored holdout and external sets."""
    split_cfg = cfgmod.replace(cfg, "data.holdout_source", clinic)
    data = runs.prepare_data(split_cfg)
    parts = {name: data.part(name) for name in ("train", "val", "holdout")}
    x = {name: np.stack([features[i] for i in part["image_id"]]) for name, part in parts.items()}
    y = {name: part["label"].to_numpy() for name, part in parts.items()}
    kernel, biases, choice = fit_linear_head(x["train"], y["train"], x["val"], y["val"])
    weights, bias = kernel[:, 0], float(biases[0])
    z = {name: x[name] @ weights + bias for name in x}
    folder = Y.run_folder(out, clinic, 1)
    folder.mkdir(parents=True, exist_ok=True)
    model.get_layer("logits").set_weights([kernel, biases])
    model.save(folder / "model.keras")
    write_atomic(folder / "config.yaml", cfgmod.to_yaml(cfgmod.replace(split_cfg, "stages", ("teacher",))))
    result = score(folder / "eval_holdout", y["val"], z["val"], parts["holdout"], z["holdout"],
                   cfg.data.source_column)
    result["external"] = {}
    for name, (frame, values) in external.items():
        ext = score(folder / "eval_holdout" / "external" / name, y["val"], z["val"], frame,
                    values @ weights + bias, cfg.data.source_column)
        result["external"][name] = {k: ext[k] for k in ("roc_auc", "roc_auc_ci", "ece_platt", "n_images")}
    result["probe"] = choice
    write_json(folder / "eval_holdout" / "metrics.json", result)
    log.info("%s held out: C=%g, val %.3f, holdout ROC-AUC %.3f%s", clinic, choice["C"],
             choice["val_score_by_C"][str(choice["C"])], result["roc_auc"],
             "".join(f", {n} {v['roc_auc']:.3f}" for n, v in result["external"].items()))
    return result


def _z(values: np.ndarray) -> np.ndarray:
    return (values - values.mean()) / (values.std() or 1.0)


def ensemble_table(out: Path, students: Path, clinics: list[str], weight: float) -> Path:
    """Per held-out clinic: the students' logit mean, and that mean blended with the probe's (standardised)."""
    lines = [f"# The probe in an ensemble with {students.name}'s students", "",
             f"Per held-out clinic: ROC-AUC of the students' mean standardised logit, and of (1 - {weight:g}) x "
             f"that + {weight:g} x the probe's (weight fixed beforehand; each model's logits standardised on the "
             "held-out images, no label used).", "",
             "| held out | students | probe alone | students + probe | difference |", "|---|---|---|---|---|"]
    summary = {}
    for clinic in clinics:
        probe = pd.read_csv(Y.run_folder(out, clinic, 1) / "eval_holdout" / "predictions.csv").set_index("image_id")
        frames = [pd.read_csv(p).set_index("image_id")
                  for p in sorted((students / clinic).glob("seed*/eval_holdout/predictions.csv"))]
        if not frames:
            raise ProbeError(f"--ensemble-with {students}: no {clinic}/seed*/eval_holdout/predictions.csv")
        ids = probe.index
        if any(set(f.index) != set(ids) for f in frames):
            raise ProbeError(f"{students}/{clinic}: the students held out other images than the probe")
        y = probe.loc[ids, "label"].to_numpy()
        mean = np.mean([_z(f.loc[ids, "logit"].to_numpy()) for f in frames], axis=0)
        blend = (1 - weight) * _z(mean) + weight * _z(probe.loc[ids, "logit"].to_numpy())
        row = {"students": M.roc_auc(y, mean), "probe": M.roc_auc(y, probe.loc[ids, "logit"].to_numpy()),
               "blend": M.roc_auc(y, blend), "n_students": len(frames)}
        summary[clinic] = row
        lines.append(f"| {clinic} | {row['students']:.3f} | {row['probe']:.3f} | {row['blend']:.3f} | "
                     f"{row['blend'] - row['students']:+.3f} |")
    write_json(out / "ensemble.json", {"students": students.name, "weight": weight, "clinics": summary})
    write_atomic(out / "ensemble.md", "\n".join(lines) + "\n")
    return out / "ensemble.md"


def run(cfg, config_name: str, out: Path, clinics: list[str], reported: list[str]) -> dict:
    """Extracts every feature once, then probes each clinic; writes plan.json and the yardstick table."""
    set_global_seed(cfg.seed, cfg.train.deterministic)  # a trunk without weights file is the same every time
    model = models.build_teacher(cfg.teacher, cfg.data.image_size, 1, cfg.data.colour_constancy)
    features_model = keras.Model(model.input, model.get_layer("avg_pool").output)
    frame = runs.prepare_data(cfg).frame
    size = cfg.data.image_size
    # features of another trunk, resolution or decoding are never mixed with these
    key = hashlib.sha256(json.dumps([cfgmod.to_dict(cfg)["teacher"], size, cfg.seed, DECODING]).encode()).hexdigest()
    folder = out / "features" / key[:12]
    values = extract(features_model, frame, size, folder, "training")
    features = dict(zip(frame["image_id"], values))
    external = {}
    for ext in cfg.data.external:
        ext_frame = E.external_frame(ext.images, ext.labels, cfg.data.labels, "skip")
        external[ext.name] = (ext_frame, extract(features_model, ext_frame, size, folder, ext.name))
    for clinic in clinics + reported:
        probe_split(cfg, clinic, features, model, external, out)
    write_json(out / "plan.json", {"config": config_name, "set": [], "clinics": clinics, "reported": reported,
                                   "seeds": [1], "random_split": False, "source_column": cfg.data.source_column,
                                   "melanomas_per_source": {}})
    return Y.write_table(out, f"probe: {cfg.teacher.arch} ({cfg.teacher.weights}), frozen, logistic head")


TABLES = ("yardstick.md", "yardstick.json", "runs.csv", "ensemble.md", "ensemble.json")


def copy_tables(out: Path, results: Path) -> list[Path]:
    """The summary tables of ``out`` (those that exist) into ``results``, for committing."""
    results.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TABLES:
        if (out / name).is_file():
            write_atomic(results / name, (out / name).read_text())
            copied.append(results / name)
    return copied


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python tools/probe_yardstick.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a teacher config (its teacher section and data)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--clinics", default="rosendahl,vidir_modern", help="clinics held out in turn")
    parser.add_argument("--reported", default="vienna_dias", help="clinics held out and shown, not averaged")
    parser.add_argument("--out", help="output folder (default runs/probe/<config name>)")
    parser.add_argument("--ensemble-with", help="a student yardstick folder to blend the probe with")
    parser.add_argument("--weight", type=float, default=0.25, help="the probe's weight in the blend")
    parser.add_argument("--results", help="also copy the tables (no model, no feature) into this folder")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> str:
        cfg = cfgmod.load(args.config, args.overrides)
        clinics = [c for c in args.clinics.split(",") if c]
        reported = [c for c in args.reported.split(",") if c]
        if not clinics:
            raise ProbeError("--clinics: at least one clinic to hold out")
        out = Path(args.out or Path("runs") / "probe" / Path(args.config).stem).resolve()
        summary = run(cfg, Path(args.config).name, out, clinics, reported)
        log.info("leave-one-clinic-out mean %.3f", summary["loco_mean"]["mean"])
        if args.ensemble_with:
            students = Path(args.ensemble_with)  # a reported clinic the students did not hold out is left out
            shown = clinics + [c for c in reported if (students / c).is_dir()]
            print(ensemble_table(out, students, shown, args.weight).read_text())
        print((out / "yardstick.md").read_text())
        if args.results:
            copy_tables(out, Path(args.results))
        return f"probe: {out}"

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())
