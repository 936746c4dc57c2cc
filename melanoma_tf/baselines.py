"""scikit-learn baselines on hand-crafted colour and texture features.

    python -m melanoma_tf.baselines --config configs/<x>.yaml [--set key=value ...] [--run RUN_DIR]
        [--models logreg,hgb,rf]

Each baseline is trained on the train split, its threshold is chosen on the
validation split by the same rule as the deep models, and it is scored on the
holdout with the same metrics. With ``--run`` the run's own ``splits.csv`` is
used, so the baselines and a trained model see identical splits. Baselines
always solve melanoma vs rest. Output: ``<output.dir>/baselines-<time>/<model>/eval_holdout/``
(``metrics.json``, ``predictions.csv``, ``report.md``, plots), readable by
``python -m melanoma_tf.compare``; last line ``run: <folder>``.
"""

from __future__ import annotations

import argparse
import io
import logging
import pickle
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from melanoma_tf import config as cfgmod
from melanoma_tf import data as datamod
from melanoma_tf import metrics as M
from melanoma_tf import report
from melanoma_tf.cli import run_main
from melanoma_tf.config import ConfigError
from melanoma_tf.evaluation import EXTERNAL_KEYS, binary_report, external_frame, write_scored_split
from melanoma_tf.files import write_atomic, write_json
from melanoma_tf.pipeline import load_images
from melanoma_tf.runs import new_run_dir, prepare_data, resolve_stage_dir

log = logging.getLogger("melanoma_tf.baselines")


def _histogram(values: np.ndarray, bins: int, upper: float) -> np.ndarray:
    """Per-image normalised histograms of ``values`` (N x pixels) in [0, upper]."""
    idx = np.clip((values / upper * bins).astype(int), 0, bins - 1)
    counts = np.stack([np.bincount(row, minlength=bins) for row in idx])
    return counts / values.shape[1]


def colour_texture_features(images: np.ndarray) -> np.ndarray:
    """Hand-crafted features per image (float RGB in [0, 255], N x H x W x 3).

    - colour: 8-bin histograms of R, G, B and of HSV hue and saturation; mean and
      std of each channel in the centre and in the border (lesion vs skin contrast);
    - texture: grey-level std, mean and std of the gradient magnitude, variance of
      the Laplacian, grey-histogram entropy;
    - an 8 x 8 RGB thumbnail.
    """
    from matplotlib.colors import rgb_to_hsv

    n, h, w, _ = images.shape
    x = images.astype(np.float32)
    flat = x.reshape(n, -1, 3)
    feats = [_histogram(flat[..., c], 8, 256.0) for c in range(3)]
    hsv = rgb_to_hsv(np.clip(x / 255.0, 0, 1)).reshape(n, -1, 3)
    feats += [_histogram(hsv[..., 0], 8, 1.0), _histogram(hsv[..., 1], 8, 1.0)]
    yy, xx = np.mgrid[0:h, 0:w]
    centre = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (min(h, w) / 4) ** 2
    for mask in (centre, ~centre):
        part = x[:, mask, :]
        feats += [part.mean(axis=1) / 255, part.std(axis=1) / 255]
    grey = x.mean(axis=-1)
    gy, gx = np.gradient(grey, axis=(1, 2))
    grad = np.hypot(gx, gy).reshape(n, -1)
    lap = (np.roll(grey, 1, 1) + np.roll(grey, -1, 1) + np.roll(grey, 1, 2) + np.roll(grey, -1, 2) - 4 * grey)
    grey_hist = _histogram(grey.reshape(n, -1), 32, 256.0)
    entropy = -(grey_hist * np.log(grey_hist + 1e-12)).sum(axis=1, keepdims=True)
    feats += [grey.reshape(n, -1).std(axis=1, keepdims=True) / 255, grad.mean(axis=1, keepdims=True) / 255,
              grad.std(axis=1, keepdims=True) / 255, lap.reshape(n, -1).var(axis=1, keepdims=True) / 255 ** 2,
              entropy]
    thumb = x.reshape(n, 8, h // 8, 8, w // 8, 3).mean(axis=(2, 4)) if h % 8 == 0 and w % 8 == 0 else \
        _resize_mean(x, 8)
    feats.append(thumb.reshape(n, -1) / 255)
    return np.concatenate(feats, axis=1).astype(np.float32)


def _resize_mean(x: np.ndarray, side: int) -> np.ndarray:
    n, h, w, c = x.shape
    rows = np.array_split(np.arange(h), side)
    cols = np.array_split(np.arange(w), side)
    return np.stack([np.stack([x[:, r][:, :, cc].mean(axis=(1, 2)) for cc in cols], 1) for r in rows], 1)


def make_baselines(seed: int) -> dict:
    """The three baseline classifiers, class-balanced."""
    return {
        "logreg": make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=3000,
                                                                     class_weight="balanced")),
        "hgb": HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, class_weight="balanced",
                                              random_state=seed),
        "rf": RandomForestClassifier(n_estimators=300, min_samples_leaf=2, class_weight="balanced_subsample",
                                     n_jobs=-1, random_state=seed),
    }


def _model_size(estimator) -> tuple[int, float]:
    """(parameter count, pickled size in MB): coefficients, or tree nodes for ensembles."""
    blob = pickle.dumps(estimator)
    final = estimator[-1] if hasattr(estimator, "steps") else estimator
    if hasattr(final, "coef_"):
        params = int(final.coef_.size + final.intercept_.size)
    elif hasattr(final, "estimators_"):
        params = int(sum(t.tree_.node_count for t in final.estimators_))
    elif hasattr(final, "_predictors"):
        params = int(sum(p.nodes.shape[0] for stage in final._predictors for p in stage))
    else:
        params = 0
    return params, len(blob) / 1e6


def _latency(estimator, features: np.ndarray, extract, image: np.ndarray, runs: int = 50) -> dict:
    """Batch-1 latency: feature extraction plus predict_proba on one image."""
    times = []
    for i in range(runs + 3):
        start = time.perf_counter()
        estimator.predict_proba(extract(image[None]))
        if i >= 3:
            times.append((time.perf_counter() - start) * 1e3)
    return {"latency_ms_median": float(np.median(times)), "latency_ms_p90": float(np.percentile(times, 90)),
            "latency_runs": runs, "runtime": "scikit-learn"}


def run_baselines(cfg, run_dir: Optional[str] = None, names: tuple[str, ...] = ("logreg", "hgb", "rf"),
                  n_boot: int = 1000, target_sensitivity: float = 0.95) -> Path:
    """Trains and scores the baselines; returns the output folder."""
    data = prepare_data(cfg)
    frame = data.frame
    if run_dir:
        manifest = datamod.read_split_manifest(_stage_dir(Path(run_dir)) / "splits.csv")
        frame = frame.drop(columns="split").merge(manifest[["image_id", "split"]], on="image_id", how="inner")
        if len(frame) != len(manifest):
            raise datamod.DataError(f"{run_dir}: {len(manifest) - len(frame)} images of its splits.csv are not "
                                    "usable with this config's data.root")
    frame = frame.assign(label=(frame["dx"] == datamod.MELANOMA).astype(int))
    unknown = set(names) - set(make_baselines(0))
    if unknown:
        raise ConfigError(f"--models: unknown baseline(s) {sorted(unknown)}; choose from {sorted(make_baselines(0))}")
    out_dir = new_run_dir(cfgmod.replace(cfg, "output.name", "baselines"))
    cfgmod.save(cfg, out_dir / "config.yaml")
    datamod.write_split_manifest(frame, out_dir, {"data": data.summary, "seed": cfg.seed, "source_run": run_dir})
    size = cfg.data.image_size
    start = time.time()
    parts = {s: frame[frame["split"] == s].reset_index(drop=True) for s in ("train", "val", "holdout")}
    features = {s: colour_texture_features(load_images(p["path"].tolist(), size)) for s, p in parts.items()}
    log.info("features %s for %d images in %.1fs", features["train"].shape[1:], len(frame), time.time() - start)
    externals = {}
    for ext in cfg.data.external:
        if not (Path(ext.images).expanduser().is_dir() and Path(ext.labels).expanduser().is_file()):
            log.info("external set %s skipped: not found", ext.name)
            continue
        ext_frame = external_frame(ext.images, ext.labels)
        externals[ext.name] = (ext_frame, colour_texture_features(load_images(ext_frame["path"].tolist(), size)))
    for name in names:
        estimator = make_baselines(cfg.seed)[name]
        t0 = time.time()
        estimator.fit(features["train"], parts["train"]["label"])
        fit_seconds = time.time() - t0
        scores = {s: np.clip(estimator.predict_proba(features[s])[:, 1], 1e-6, 1 - 1e-6) for s in ("val", "holdout")}
        test = parts["holdout"]
        result = binary_report(parts["val"]["label"].to_numpy(), M.logit(scores["val"]), test["label"].to_numpy(),
                               M.logit(scores["holdout"]), test["lesion_id"].to_numpy(),
                               target_sensitivity=target_sensitivity, n_boot=n_boot, seed=cfg.seed)
        params, mb = _model_size(estimator)
        one = load_images(test["path"].tolist()[:1], size)[0]
        result.update(_latency(estimator, features["holdout"], colour_texture_features, one))
        result.update({"params": params, "size_mb": mb, "flops": None, "fit_seconds": fit_seconds,
                       "val_roc_auc": M.roc_auc(parts["val"]["label"], scores["val"]),
                       "model": f"{name} on colour/texture features", "model_name": f"baseline_{name}",
                       "split": "holdout", "threshold_source": "validation", "run": str(out_dir / name)})
        eval_dir = out_dir / name / "eval_holdout"
        eval_dir.mkdir(parents=True, exist_ok=True)
        _, figures = write_scored_split(eval_dir, test, M.logit(scores["holdout"]), test["label"].to_numpy(), result)
        result["external"] = _score_externals(estimator, externals, parts["val"]["label"].to_numpy(), scores["val"],
                                              eval_dir, name, cfg.seed, target_sensitivity, n_boot)
        write_json(eval_dir / "metrics.json", result)
        buffer = io.BytesIO()
        pickle.dump(estimator, buffer)
        write_atomic(out_dir / name / "model.pkl", buffer.getvalue())
        report.write_report(eval_dir, result, figures, [])
        print(f"== baseline {name}: val ROC-AUC {result['val_roc_auc']:.4f}, holdout ROC-AUC "
              f"{result['roc_auc']:.4f}, specificity {result['specificity']:.3f} at sensitivity "
              f"{result['sensitivity']:.3f}", flush=True)
    return out_dir


def _score_externals(estimator, externals: dict, val_y: np.ndarray, val_scores: np.ndarray, eval_dir: Path, name: str,
                     seed: int, target_sensitivity: float, n_boot: int) -> dict:
    """Scores a fitted baseline on each external set at the validation-chosen threshold."""
    summary = {}
    for ext_name, (ext_frame, ext_features) in externals.items():
        ext_scores = np.clip(estimator.predict_proba(ext_features)[:, 1], 1e-6, 1 - 1e-6)
        ext_result = binary_report(val_y, M.logit(val_scores), ext_frame["label"].to_numpy(), M.logit(ext_scores),
                                   ext_frame["lesion_id"].to_numpy(), target_sensitivity=target_sensitivity,
                                   n_boot=n_boot, seed=seed)
        ext_dir = eval_dir / "external" / ext_name
        ext_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(ext_dir / "predictions.csv", ext_frame[["image_id", "lesion_id", "label"]].assign(
            probability=ext_scores).to_csv(index=False))
        write_json(ext_dir / "metrics.json", {**ext_result, "model_name": f"baseline_{name}", "split": "external"})
        summary[ext_name] = {"folder": f"external/{ext_name}", **{k: ext_result.get(k) for k in EXTERNAL_KEYS}}
    return summary


def _stage_dir(run_dir: Path) -> Path:
    return resolve_stage_dir(run_dir)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m melanoma_tf.baselines", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run", help="use this run's splits.csv")
    parser.add_argument("--models", default="logreg,hgb,rf")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)
    return run_main(lambda: "run: " + str(run_baselines(
        cfgmod.load(args.config, args.overrides), args.run,
        tuple(m.strip() for m in args.models.split(",") if m.strip()), args.bootstrap)))


if __name__ == "__main__":
    sys.exit(main())
