"""Sweeps: grid/random trials, K folds per trial, parallel workers, resume, results and Pareto front."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO
from melanoma_tf import sweep as S
from melanoma_tf.config import ConfigError


def write_sweep(tmp_path, synthetic_root, **extra):
    spec = {
        "base": str(REPO / "configs" / "student_mobilenetv3.yaml"),
        "set": [f"data.root={synthetic_root}", "data.image_size=32", "student.minimalistic=true",
                "student.alpha=0.75", "train.epochs=1", "train.verbose=0", "data.augment.rotation=0.0",
                "data.external=[]"],
        "axes": {"student.pooling": ["avg", "max"],
                 "loss": {"bce": {"loss.name": "bce"}, "focal_2": {"loss.name": "focal", "loss.gamma": 2.0}}},
        "search": "grid", "folds": 2, "workers": 2, "output": str(tmp_path / "sweeps"),
    }
    external = extra.pop("external", None)
    if external:
        spec["set"][-1] = f"data.external=[{{name: clinic, images: {external[0]}, labels: {external[1]}}}]"
    spec.update(extra)
    path = tmp_path / "sweep_tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_trials_grid_random_and_errors(tmp_path, synthetic_root):
    spec = S.load_sweep(write_sweep(tmp_path, synthetic_root))
    grid = S.trials(spec)
    assert len(grid) == 4 and {t["loss"] for t in grid} == {"bce", "focal_2"}
    assert len({S.trial_id(t) for t in grid}) == 4
    overrides = S.trial_overrides(spec, grid[-1], 1, tmp_path / "t" / "fold-1")
    assert "loss.gamma=2.0" in overrides and "data.folds=2" in overrides and "data.fold=1" in overrides
    random = S.load_sweep(write_sweep(tmp_path, synthetic_root, search="random", trials=3, seed=1))
    picked = S.trials(random)
    assert len(picked) == 3 and picked == S.trials(random)  # seeded
    with pytest.raises(ConfigError, match="unknown sweep key"):
        S.load_sweep(write_sweep(tmp_path, synthetic_root, axis={}))
    with pytest.raises(ConfigError, match=r"student\.poolin"):
        S.load_sweep(write_sweep(tmp_path, synthetic_root, axes={"student.poolin": ["avg"]}))
    with pytest.raises(ConfigError, match="student.pooling"):
        S.load_sweep(write_sweep(tmp_path, synthetic_root, axes={"student.pooling": ["mean"]}))
    with pytest.raises(ConfigError, match="trial budget"):
        S.load_sweep(write_sweep(tmp_path, synthetic_root, search="random"))
    with pytest.raises(ConfigError, match="quantize: unknown mode"):
        S.load_sweep(write_sweep(tmp_path, synthetic_root, quantize=["int3"]))
    with pytest.raises(ConfigError, match="backend"):
        S.load_sweep(write_sweep(tmp_path, synthetic_root, backend="slurm"))
    with pytest.raises(ConfigError, match="ray:"):
        S.load_sweep(write_sweep(tmp_path, synthetic_root, backend="ray", ray={"adress": "auto"}))
    quant = S.load_sweep(write_sweep(tmp_path, synthetic_root, quantize=["fp16", "4-bit"]))
    assert quant.quantize == ["fp16", "int4"] and quant.columns[-1] == "quantization"


def test_pareto_front():
    sizes = np.array([1.0, 2.0, 3.0, 1.5, 3.0])
    scores = np.array([0.80, 0.85, 0.90, 0.79, 0.88])
    assert S.pareto_front(sizes, scores).tolist() == [True, True, True, False, False]


@pytest.mark.slow
def test_local_sweep_folds_quantization_external_resume_and_summary(tmp_path, synthetic_root):
    """One random trial, 2 folds in 2 parallel workers, each fold's model also as fp16 and int8 (scored on its
    validation fold), an external set reported beside; then resume."""
    meta = pd.read_csv(synthetic_root / "HAM10000_metadata.csv").head(40)  # a stand-in external set
    labels = tmp_path / "clinic.csv"
    meta.assign(label=(meta["dx"] == "mel").astype(int))[["image_id", "label"]].to_csv(labels, index=False)
    spec = S.load_sweep(write_sweep(tmp_path, synthetic_root, search="random", trials=1, seed=3,
                                    quantize=["fp16", "int8"], external=(synthetic_root / "images", labels)))
    root = S.run_sweep(spec)
    folds = pd.read_csv(root / "folds.csv")
    assert folds["fold"].tolist() == [0, 0, 0, 1, 1, 1]
    assert folds["quantization"].tolist() == ["keras", "fp16", "int8"] * 2
    assert (folds["latency_ms"] > 0).all() and (folds["size_mb"] > 0).all()
    for _, fold in folds.groupby("fold"):
        size = dict(zip(fold["quantization"], fold["size_mb"]))
        assert size["int8"] < size["fp16"] < size["keras"]
    # Each mode is scored on the fold's validation split; the holdout is never touched by a sweep.
    trial_dir = root / folds["trial"].iloc[0]
    stage = trial_dir / "fold-1" / "tflite"
    assert not (stage / "eval_int8").exists()
    int8 = json.loads((stage / "eval_val_int8" / "metrics.json").read_text())
    row = folds[(folds["fold"] == 1) & (folds["quantization"] == "int8")]
    assert row["val_roc_auc"].item() == pytest.approx(int8["roc_auc"])
    # The external set's ROC-AUC is a column of every row (reported, never the ranking metric).
    assert folds["ext_clinic_roc_auc"].notna().all()
    assert row["ext_clinic_roc_auc"].item() == pytest.approx(int8["external"]["clinic"]["roc_auc"])
    with pytest.raises(ConfigError, match="metric: 'ext_clinic_roc_auc' is not one of the validation scores"):
        S.load_sweep(write_sweep(tmp_path, synthetic_root, metric="ext_clinic_roc_auc"))

    # results: one row per trial and mode, the mean and spread over the folds, best first
    table = pd.read_csv(root / "results.csv")
    assert len(table) == 3 and (table["folds"] == 2).all()
    assert list(table["val_roc_auc_mean"]) == sorted(table["val_roc_auc_mean"], reverse=True)
    keras_folds = folds[folds["quantization"] == "keras"]["val_roc_auc"]
    keras_row = table[table["quantization"] == "keras"]
    assert keras_row["val_roc_auc_mean"].item() == pytest.approx(keras_folds.mean())
    assert keras_row["val_roc_auc_std"].item() == pytest.approx(keras_folds.std())
    for png in ("metric_per_axis.png", "pareto_size.png", "pareto_latency.png"):
        assert (root / png).is_file()
    results_md = (root / "results.md").read_text()
    assert "Pareto front (latency" in results_md and "ext_clinic_roc_auc" in results_md
    # each fold is an ordinary run folder whose validation fold differs
    splits = [pd.read_csv(trial_dir / f"fold-{i}" / "splits.csv") for i in range(2)]
    assert set(splits[0].query("split == 'val'")["image_id"]).isdisjoint(splits[1].query("split == 'val'")["image_id"])

    # resume: finished runs are not trained again; a lost one is
    logs = {p: p.stat().st_size for p in root.rglob("fold-*.log")}
    victim = trial_dir / "fold-1" / "metrics.json"
    victim.unlink()
    S.run_sweep(spec)
    grown = [p for p in root.rglob("fold-*.log") if p.stat().st_size != logs[p]]
    assert grown == [trial_dir / "fold-1.log"]
    assert victim.is_file()
    assert json.loads(victim.read_text())["val_roc_auc"] is not None


@pytest.mark.slow
def test_ray_sweep_on_a_local_two_node_cluster(tmp_path, synthetic_root):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2 ** 20})
    cluster.add_node(num_cpus=1, object_store_memory=80 * 2 ** 20)
    try:
        spec = S.load_sweep(write_sweep(tmp_path, synthetic_root, axes={"student.pooling": ["avg", "max"]},
                                        folds=0, workers=2, backend="ray",
                                        ray={"address": cluster.address, "cpus_per_trial": 1}))
        root = S.run_sweep(spec)
        folds = pd.read_csv(root / "folds.csv")
        assert sorted(folds["student.pooling"]) == ["avg", "max"]
        assert folds["val_roc_auc"].notna().all()
        assert folds["node"].nunique() == 2  # one trial on each node of the cluster
        for trial in folds["trial"]:
            assert (root / trial / "fold-0" / "model.keras").is_file()  # ordinary run folders
        logs = {p: p.stat().st_size for p in root.rglob("fold-*.log")}
        S.run_sweep(spec)  # resumed through Ray: nothing is trained again
        assert {p: p.stat().st_size for p in root.rglob("fold-*.log")} == logs
    finally:
        ray.shutdown()
        cluster.shutdown()
