"""The proposal's KD grid: its file checked, its points in order, teachers per clinic, the scores of each cell."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO
from melanoma_tf import metrics as M
from melanoma_tf import synthetic

sys.path.insert(0, str(REPO / "tools"))
import kd_grid as G  # noqa: E402

CLINICS = ["clinic_a", "clinic_b"]


def _grid_file(tmp_path: Path, **changes) -> Path:
    values = yaml.safe_load((REPO / "configs" / "kd_grid.yaml").read_text())
    values["config"] = str(REPO / "configs" / values["config"])
    values["clinics"] = CLINICS
    values.update(changes)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _fake_point(out: Path, point: G.Point, quality: float, seeds=(1, 2), n: int = 120) -> None:
    """Finished runs of ``point``: predictions whose ROC-AUC grows with ``quality``, the same images per clinic."""
    root = out / point.name
    for c, clinic in enumerate(CLINICS):
        labels = np.random.default_rng(c).random(n) < 0.3
        for seed in seeds:
            noise = np.random.default_rng(100 * c + seed).normal(size=n)
            folder = root / clinic / f"seed{seed}" / "eval_holdout"
            (folder / "external" / "isic2017").mkdir(parents=True, exist_ok=True)
            frame = pd.DataFrame({"image_id": [f"{clinic}_{i}" for i in range(n)],
                                  "lesion_id": [f"{clinic}_L{i // 2}" for i in range(n)], "label": labels.astype(int),
                                  "probability": 1 / (1 + np.exp(-(quality * labels + noise)))})
            frame.to_csv(folder / "predictions.csv", index=False)
            isic_labels = np.random.default_rng(99).random(n) < 0.2  # the same external images for every model
            isic = pd.DataFrame({"image_id": [f"isic_{i}" for i in range(n)], "label": isic_labels.astype(int),
                                 "probability": 1 / (1 + np.exp(-(quality * isic_labels - noise)))})
            isic.assign(lesion_id=isic["image_id"]).to_csv(folder / "external" / "isic2017" / "predictions.csv",
                                                          index=False)
            auc = M.roc_auc(frame["label"], frame["probability"])
            (folder / "metrics.json").write_text(json.dumps({"roc_auc": auc, "n_images": n}))
    (root / "plan.json").write_text(json.dumps({"clinics": CLINICS, "reported": [], "seeds": list(seeds),
                                                "random_split": False}))


def test_a_bad_grid_file_is_refused_naming_the_key(tmp_path):
    assert G.load_grid(_grid_file(tmp_path)).alphas == [0.1, 0.3, 0.5, 0.7, 0.9]
    cases = [({"design": [{"phase": "t_alpha", "losses": ["hinge"]}]}, r"design\[0\]: loss\(es\) \['hinge'\]"),
             ({"design": [{"phase": "t_alpha", "alphas": [0.2]}]}, r"design\[0\]: alphas \[0.2\] are not on"),
             ({"design": [{"phase": "sideways"}]}, r"design\[0\]: phase must be one of"),
             ({"config": "nowhere.yaml"}, "config: no file"), ({"colour": 1}, r"unknown key\(s\) \['colour'\]")]
    for changes, message in cases:
        with pytest.raises(G.GridError, match=message):
            G.load_grid(_grid_file(tmp_path, **changes))
    values = yaml.safe_load(_grid_file(tmp_path).read_text())
    del values["seeds"]
    (tmp_path / "no_seeds.yaml").write_text(yaml.safe_dump(values))
    with pytest.raises(G.GridError, match=r"no_seeds.yaml: missing key\(s\) \['seeds'\]"):
        G.load_grid(tmp_path / "no_seeds.yaml")


def test_points_come_in_the_design_order_and_pooling_follows_the_best_kd_point(tmp_path):
    grid = G.load_grid(_grid_file(tmp_path))
    out = tmp_path / "runs"
    points = G.expand(grid, out)
    names = [p.name for p in points]
    assert names[:10] == (["nokd-bce-avg"] + [f"kd-bce-T{t}-a0.5-avg" for t in (1, 2, 4, 8)]
                          + [f"kd-bce-T2-a{a}-avg" for a in (0.1, 0.3, 0.7, 0.9)] + ["nokd-bce-max"])
    assert names[10:12] == ["nokd-wbce-avg", "nokd-focal-avg"]
    full = {f"kd-bce-T{t}-a{a}-avg" for t in (1, 2, 4, 8) for a in (0.1, 0.3, 0.5, 0.7, 0.9)}
    assert set(names[:24]) - {"nokd-bce-avg", "nokd-bce-max", "nokd-wbce-avg", "nokd-focal-avg"} == full
    assert "kd-wbce-T8-a0.9-avg" in names and "kd-wbce-T2-a0.3-avg" not in names  # the fractional part
    assert names[-2:] == ["nokd-wbce-max", "nokd-focal-max"] and len(set(names)) == len(names) == 50
    # Once KD points of bce have finished, the best of them is rerun with max pooling.
    _fake_point(out, G.Point("t_alpha", "bce", "avg", 2.0, 0.5), quality=1.0)
    _fake_point(out, G.Point("t_alpha", "bce", "avg", 4.0, 0.1), quality=2.5)
    _fake_point(out, G.Point("t_alpha", "bce", "avg", 8.0, 0.9), quality=3.0, seeds=(1,))  # not finished
    assert G.best_kd_point(out, grid, "bce").name == "kd-bce-T4-a0.1-avg"
    assert "kd-bce-T4-a0.1-max" in [p.name for p in G.expand(grid, out)]
    assert G.best_kd_point(out, grid, "focal") is None
    # A max-pooling point trained while another KD point was the best is not dropped once a better one finishes.
    _fake_point(out, G.Point("pooling", "bce", "max", 4.0, 0.1), quality=2.0)
    _fake_point(out, G.Point("t_alpha", "bce", "avg", 1.0, 0.9), quality=3.5)
    names = [p.name for p in G.expand(grid, out)]
    assert {"kd-bce-T4-a0.1-max", "kd-bce-T1-a0.9-max"} <= set(names) and len(set(names)) == len(names)
    assert "kd-bce-T4-a0.1-max" in set(G.score_grid(grid, out, n_boot=20)["point"])

    kd = G.overrides(grid, G.Point("t_alpha", "wbce", "avg", 4.0, 0.3), Path("/t"), out)
    assert "stages=[distill]" in kd and "distill.teacher=/t/{split}/seed*" in kd and "distill.alpha=0.3" in kd
    assert "distill.temperature=4" in kd and "loss.name=wbce" in kd and "student.pooling=avg" in kd
    assert f"distill.teacher_cache={out / 'teacher_cache'}" in kd
    plain = G.overrides(grid, G.Point("reference", "focal", "max"), Path("/t"), out)
    assert "stages=[student]" in plain and not any(s.startswith("distill.") for s in plain)


def test_teachers_must_exist_for_every_clinic_and_must_not_have_seen_it(tmp_path):
    grid = G.load_grid(_grid_file(tmp_path))
    teachers = tmp_path / "teachers"
    for clinic, held_out in (("clinic_a", "clinic_a"), ("clinic_b", "clinic_a")):
        (teachers / clinic / "seed1").mkdir(parents=True)
        (teachers / clinic / "seed1" / "model.keras").write_bytes(b"")
        (teachers / clinic / "seed1" / "config.yaml").write_text(yaml.safe_dump({"data": {"holdout_source":
                                                                                          held_out}}))
    with pytest.raises(G.GridError, match=r"clinic_b/seed1: trained with data.holdout_source='clinic_a'"):
        G.check_teachers(teachers, grid)
    with pytest.raises(G.GridError, match=r"no clinic_a/seed\*/model.keras"):
        G.check_teachers(tmp_path / "elsewhere", grid)


def test_each_cell_is_scored_with_an_interval_and_paired_with_its_no_kd_row(tmp_path):
    grid = G.load_grid(_grid_file(tmp_path))
    out = tmp_path / "runs"
    reference, better = G.Point("reference", "bce"), G.Point("t_alpha", "bce", "avg", 2.0, 0.5)
    _fake_point(out, reference, quality=1.0)
    _fake_point(out, better, quality=2.0)
    row = G.score_point(out, better, grid, n_boot=200)
    aucs = {c: [json.loads((out / better.name / c / f"seed{s}" / "eval_holdout" / "metrics.json").read_text())
                ["roc_auc"] for s in (1, 2)] for c in CLINICS}
    assert row["loco_mean"] == pytest.approx(np.mean(list(aucs.values())))
    assert row["clinic_a"] == pytest.approx(np.mean(aucs["clinic_a"]))
    assert row["loco_low"] < row["loco_mean"] < row["loco_high"] and row["runs"] == 4
    base = G.score_point(out, reference, grid, n_boot=200)
    assert row["vs_nokd"] == pytest.approx(row["loco_mean"] - base["loco_mean"]) and row["vs_nokd_low"] > 0
    isic = [pd.read_csv(out / better.name / c / f"seed{s}" / "eval_holdout" / "external" / "isic2017" /
                        "predictions.csv") for c in CLINICS for s in (1, 2)]
    assert row["isic2017_mean"] == pytest.approx(np.mean([M.roc_auc(f["label"], f["probability"]) for f in isic]))
    assert row["isic2017_low"] < row["isic2017_mean"] < row["isic2017_high"]
    assert "vs_nokd" not in base and "vs_avg" not in row
    # a max-pooling point is also paired with the same point under average pooling
    worse_max = G.Point("pooling", "bce", "max", 2.0, 0.5)
    _fake_point(out, worse_max, quality=0.5)
    pooled = G.score_point(out, worse_max, grid, n_boot=200)
    assert pooled["vs_avg"] == pytest.approx(pooled["loco_mean"] - row["loco_mean"]) and pooled["vs_avg_high"] < 0
    shutil.rmtree(out / worse_max.name)

    md = G.write_results(grid, out, tmp_path / "results", n_boot=100)
    text = md.read_text()
    assert "2 of 51 planned points finished" in text and "t_alpha_bce.png" in text
    assert f"{row['loco_mean']:.3f}" in text and f"{row['vs_nokd']:+.3f}" in text
    assert "Not finished yet (49)" in text and (tmp_path / "results" / "t_alpha_bce.png").stat().st_size > 1000
    # the section a documentation page includes: the table and what is left, no picture (its path would break)
    section = text.split(G.SNIPPET.format("start"))[1].split(G.SNIPPET.format("end"))[0]
    assert section.strip().startswith("| point |") and "Not finished yet (49)" in section and "![" not in section
    assert str(tmp_path) not in text + (tmp_path / "results" / "grid.csv").read_text()


def test_archived_points_restore_on_another_machine_with_the_same_scores(tmp_path):
    grid = G.load_grid(_grid_file(tmp_path))
    out, archive = tmp_path / "runs", tmp_path / "results" / "points"
    reference, better = G.Point("reference", "bce"), G.Point("t_alpha", "bce", "avg", 2.0, 0.5)
    _fake_point(out, reference, quality=1.0)
    _fake_point(out, better, quality=2.0)
    # the runs list their images in another order than the archive: restored by image, not by row
    first = out / better.name / "clinic_a" / "seed2" / "eval_holdout" / "predictions.csv"
    pd.read_csv(first).iloc[::-1].to_csv(first, index=False)
    rows = {p.name: G.score_point(out, p, grid, n_boot=100) for p in (reference, better)}
    for point in (reference, better):
        assert G.archive_point(out, point, grid, archive).stat().st_size > 1000
    assert sorted(p.name for p in (archive / "sets").iterdir()) == ["clinic_a.csv", "clinic_b.csv", "isic2017.csv"]

    elsewhere = tmp_path / "elsewhere"
    assert G.restore_points(grid, elsewhere, archive) == [better.name, reference.name]
    assert G.finished_loco(elsewhere, better, grid) == pytest.approx(G.finished_loco(out, better, grid))
    for name, row in rows.items():
        again = G.score_point(elsewhere, next(p for p in (reference, better) if p.name == name), grid, n_boot=100)
        for key in ("loco_mean", "loco_low", "loco_high", "clinic_a", "isic2017_mean", "vs_nokd", "vs_nokd_low"):
            if key in row:
                assert again[key] == pytest.approx(row[key], abs=1e-6), (name, key)
    assert G.restore_points(grid, elsewhere, archive) == []  # already there: left alone

    with pytest.raises(G.GridError, match=r"kd-bce-T2-a0.5-avg: clinic_a/seed1 has not finished"):
        _fake_point(tmp_path / "half", better, quality=2.0, seeds=(2,))
        G.archive_point(tmp_path / "half", better, grid, archive)
    (archive / "kd-bce-T4-a0.5-avg.npz").write_bytes(b"cut")
    with pytest.raises(G.GridError, match=r"kd-bce-T4-a0.5-avg.npz: not a grid point archive"):
        G.restore_points(grid, tmp_path / "third", archive)
    (archive / "kd-bce-T4-a0.5-avg.npz").unlink()
    other = tmp_path / "other"
    _fake_point(other, reference, quality=1.0, n=80)  # fewer images: another data set
    with pytest.raises(G.GridError, match=r"sets/clinic_a.csv: lists other images"):
        G.archive_point(other, reference, grid, archive)


def test_hand_edited_archives_are_refused_naming_the_file_and_what_is_wrong(tmp_path):
    grid = G.load_grid(_grid_file(tmp_path))
    out, archive = tmp_path / "runs", tmp_path / "results" / "points"
    point = G.Point("reference", "bce")
    _fake_point(out, point, quality=1.0)
    G.archive_point(out, point, grid, archive)
    listing = archive / "sets" / "clinic_a.csv"
    pd.read_csv(listing).drop(columns="lesion_id").to_csv(listing, index=False)
    with pytest.raises(G.GridError, match=r"sets/clinic_a.csv: missing column\(s\) \['lesion_id'\] \(needed by "
                                          r"nokd-bce-avg.npz\)"):
        G.restore_points(grid, tmp_path / "elsewhere", archive)
    with pytest.raises(G.GridError, match=r"sets/clinic_a.csv: missing column"):
        G.archive_point(out, point, grid, archive)  # archiving beside a damaged list is refused too
    listing.unlink()
    G.archive_point(out, point, grid, archive)  # the list is written again from the runs
    G._save_npz(archive / "quant" / "nokd-bce-avg.npz", {"clinic_a/keras/holdout": np.zeros(3)},
                sizes={}, modes=["keras"])
    with pytest.raises(G.GridError, match=r"quant/nokd-bce-avg.npz: entry 'clinic_a/keras/holdout' is not "
                                          r"<clinic>/seed<k>/<mode>/<set>"):
        G.score_quant(grid, archive, n_boot=10)
    with np.load(archive / "nokd-bce-avg.npz") as saved:
        arrays = {k: saved[k] for k in saved.files if k != "metrics"}
        metrics = {k.replace("/seed", "/run"): v for k, v in json.loads(str(saved["metrics"])).items()}
    G._save_npz(archive / "nokd-bce-avg.npz", arrays, metrics=metrics)
    with pytest.raises(G.GridError, match=r"nokd-bce-avg.npz: run 'clinic_a/run1' is not <clinic>/seed<k>"):
        G.restore_points(grid, tmp_path / "third", archive)


def _nested(items: list[str]) -> dict:
    """``a.b=c`` overrides as a nested YAML mapping."""
    out: dict = {}
    for item in items:
        key, value = item.split("=", 1)
        *parents, last = key.split(".")
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = yaml.safe_load(value)
    return out


def _small_teacher(path: Path, seed: int) -> None:
    from melanoma_tf.backend import keras

    image = keras.Input((32, 32, 3), name="image")
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(image))
    path.parent.mkdir(parents=True, exist_ok=True)
    keras.Model(image, keras.layers.Dense(1, kernel_initializer=keras.initializers.RandomNormal(seed=seed))(pooled)
                ).save(path)


def test_a_paired_interval_is_of_the_difference_of_the_same_images(tmp_path):
    grid = G.load_grid(_grid_file(tmp_path))
    out = tmp_path / "runs"
    _fake_point(out, G.Point("reference", "bce"), quality=1.0)
    _fake_point(out, G.Point("reference", "focal"), quality=2.0)
    worse = [G._predictions(out / "nokd-bce-avg", c, grid.seeds) for c in CLINICS]
    better = [G._predictions(out / "nokd-focal-avg", c, grid.seeds) for c in CLINICS]
    itself = G.mean_auc_interval(better, 100, against=better)
    assert itself == {"mean": 0.0, "low": 0.0, "high": 0.0}
    paired = G.mean_auc_interval(better, 200, against=worse)
    plain = [G.mean_auc_interval(g, 200)["mean"] for g in (better, worse)]
    assert paired["mean"] == pytest.approx(plain[0] - plain[1]) and 0 < paired["low"] < paired["mean"]
    with pytest.raises(G.GridError, match="different images"):
        G.mean_auc_interval(better, 10, against=[[f.iloc[:-1] for f in g] for g in worse])


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
    """A tiny grid, trained once: a no-KD row and one KD point, each holding out two clinics with that clinic's
    teacher, ISIC 2017 played by another synthetic set. Returns its paths and the line the first run printed."""
    tmp_path = tmp_path_factory.mktemp("tiny_grid")
    root = synthetic.generate(tmp_path / "data", n_lesions=90, melanoma_fraction=0.4, image_size=40, seed=3)
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    lesions = sorted(meta["lesion_id"].unique())
    meta["clinic"] = meta["lesion_id"].map({lesion: CLINICS[i % 2] for i, lesion in enumerate(lesions)})
    meta.to_csv(root / "HAM10000_metadata.csv", index=False)
    external = synthetic.generate(tmp_path / "external", n_lesions=40, melanoma_fraction=0.4, image_size=40, seed=8)
    ext_meta = pd.read_csv(external / "HAM10000_metadata.csv")
    ext_meta.assign(label=(ext_meta["dx"] == "mel").astype(int))[["image_id", "label"]].to_csv(
        external / "labels.csv", index=False)
    tiny = [f"data.root={root}", "data.image_size=32", "data.augment.rotation=0.0", "student.weights=null",
            "student.minimalistic=true", "student.alpha=0.75", "student.bn_reestimate_images=0",
            "train.epochs=1", "train.batch_size=32", "train.verbose=0", "train.warmup_epochs=0",
            "data.source_column=clinic"]
    teachers = tmp_path / "teachers"  # one small model per clinic, trained elsewhere without it
    for k, clinic in enumerate(CLINICS):
        _small_teacher(teachers / clinic / "seed1" / "model.keras", seed=k)
        (teachers / clinic / "seed1" / "config.yaml").write_text(yaml.safe_dump({"data": {"holdout_source": clinic}}))
    grid_file = _grid_file(tmp_path, seeds=[1], design=[{"phase": "reference", "losses": ["bce"]},
                                                          {"phase": "t_alpha", "losses": ["bce"],
                                                           "temperatures": [2], "alphas": [0.5]}])
    values = yaml.safe_load(grid_file.read_text())
    values["config"] = str(tmp_path / "point.yaml")
    point_config = {"base": str(REPO / "configs" / "kd_grid_student.yaml"), **_nested(tiny)}
    point_config["data"]["external"] = [{"name": "isic2017", "images": str(external / "images"),
                                         "labels": str(external / "labels.csv")}]
    (tmp_path / "point.yaml").write_text(yaml.safe_dump(point_config))
    grid_file.write_text(yaml.safe_dump(values))
    out, results = tmp_path / "grid", tmp_path / "results"
    printed = _main_output(["--grid", str(grid_file), "--teachers", str(teachers), "--out", str(out),
                            "--results", str(results)])
    return {"tmp": tmp_path, "grid_file": grid_file, "teachers": teachers, "out": out, "results": results,
            "printed": printed}


def _main_output(argv: list[str]) -> str:
    """The last line ``kd_grid.main`` prints (it must succeed)."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert G.main(argv) == 0
    return buffer.getvalue().strip().splitlines()[-1]


@pytest.mark.slow
def test_a_tiny_grid_trains_with_each_clinics_own_teacher_and_resumes(tiny_grid):
    """The grid: a no-KD row and one KD point, each holding out two clinics, each run with that clinic's teacher."""
    tmp_path, grid_file, teachers = tiny_grid["tmp"], tiny_grid["grid_file"], tiny_grid["teachers"]
    out, results = tiny_grid["out"], tiny_grid["results"]
    assert tiny_grid["printed"] == f"grid: {out} (2 point(s) run)"
    for clinic in CLINICS:
        run = out / "kd-bce-T2-a0.5-avg" / clinic / "seed1"
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["distill"]["teacher"] == [str(teachers / clinic / "seed*")]
        assert config["data"]["holdout_source"] == clinic
        assert (run / "teacher_logits.npz").is_file()
    assert len(list((out / "teacher_cache").glob("teacher_logits_*.npz"))) == 2  # one teacher per clinic
    logs = {p: p.stat().st_size for p in out.rglob("seed*.log")}
    assert G.main(["--grid", str(grid_file), "--teachers", str(teachers), "--out", str(out),
                   "--results", str(results)]) == 0
    assert {p: p.stat().st_size for p in out.rglob("seed*.log")} == logs  # finished: nothing trained again
    assert sorted(p.name for p in (results / "points").glob("*.npz")) == ["kd-bce-T2-a0.5-avg.npz",
                                                                          "nokd-bce-avg.npz"]
    assert G.main(["--grid", str(grid_file), "--out", str(out), "--summarise", "--results", str(results),
                   "--bootstrap", "50"]) == 0
    table = pd.read_csv(results / "grid.csv").set_index("point")
    assert list(table.index) == ["nokd-bce-avg", "kd-bce-T2-a0.5-avg"]
    assert np.isfinite(table.loc["kd-bce-T2-a0.5-avg", "vs_nokd"])
    # Another machine with only the committed results: nothing trains, the table is the same.
    elsewhere = tmp_path / "elsewhere"
    assert _main_output(["--grid", str(grid_file), "--teachers", str(teachers), "--out", str(elsewhere),
                         "--results", str(results)]) == f"grid: {elsewhere} (0 point(s) run)"
    assert not list(elsewhere.rglob("seed*.log"))
    restored = pd.read_csv(results / "grid.csv").set_index("point")
    pd.testing.assert_frame_equal(restored, table)


@pytest.mark.slow
def test_the_quantization_panel_scores_each_mode_beside_fp32_on_the_same_runs(tiny_grid):
    """--quantize on the tiny grid's no-KD row: every run converted to fp16, int8 and QAT, archived, tabled."""
    tmp_path, grid_file, teachers = tiny_grid["tmp"], tiny_grid["grid_file"], tiny_grid["teachers"]
    out, results = tiny_grid["out"], tiny_grid["results"]
    common = ["--grid", str(grid_file), "--teachers", str(teachers), "--out", str(out), "--results", str(results),
              "--bootstrap", "50"]
    assert _main_output(common + ["--quantize", "nokd-bce-avg", "--modes", "fp16,int8,qat"]) == \
        f"quantization panel: {results / 'quant.md'}"
    table = pd.read_csv(results / "quant.csv")
    assert list(table["mode"]) == ["keras", "fp16", "int8", "qat"] and set(table["point"]) == {"nokd-bce-avg"}
    rows = table.set_index("mode")
    run = out / "nokd-bce-avg" / CLINICS[0] / "seed1"  # quantized where it was trained: it has its models
    assert rows.loc["int8", "size_mb"] == pytest.approx(np.mean(
        [(out / "nokd-bce-avg" / c / "seed1" / "tflite" / "int8.tflite").stat().st_size for c in CLINICS]) / 1e6)
    assert rows.loc["int8", "size_mb"] < rows.loc["fp16", "size_mb"]
    fp16 = pd.read_csv(G.quant_eval_dir(run, "fp16") / "predictions.csv")
    keras_fp32 = pd.read_csv(G.quant_eval_dir(run, "keras") / "predictions.csv")
    assert np.abs(fp16["probability"] - keras_fp32["probability"]).max() < 0.01  # fp16 is fp32 within rounding
    assert np.isnan(rows.loc["keras", "loco_vs_fp32"])  # (a 1-epoch 32 px model: its ROC-AUCs are near-ties)
    with np.load(results / "points" / "quant" / "nokd-bce-avg.npz") as saved:  # what the panel keeps of each mode
        order = pd.read_csv(results / "points" / "sets" / f"{CLINICS[0]}.csv", dtype={"image_id": str})["image_id"]
        for mode in ("keras", "fp16", "int8", "qat"):
            scored = pd.read_csv(G.quant_eval_dir(run, mode) / "predictions.csv", dtype={"image_id": str})
            np.testing.assert_allclose(saved[f"{CLINICS[0]}/seed1/{mode}/holdout"],
                                       scored.set_index("image_id").loc[order, "probability"], rtol=1e-6)
    for mode in ("fp16", "int8", "qat"):
        assert rows.loc[mode, "loco_vs_fp32"] == pytest.approx(rows.loc[mode, "loco_mean"] - rows.loc["keras",
                                                                                                     "loco_mean"])
        assert np.isfinite(rows.loc[mode, "isic2017_vs_fp32"])
    text = (results / "quant.md").read_text()
    assert "| nokd-bce-avg | int8 QAT |" in text and (results / "quantization.png").stat().st_size > 1000
    assert str(tmp_path) not in text + (results / "quant.csv").read_text()
    # Done once: asked again, nothing is converted again; on another machine the committed results give the panel.
    logs = {p: p.stat().st_mtime for p in out.rglob("quantize.log")}
    assert G.main(common + ["--quantize", "nokd-bce-avg", "--modes", "int8"]) == 0
    assert {p: p.stat().st_mtime for p in out.rglob("quantize.log")} == logs
    elsewhere = tmp_path / "elsewhere_quantized"
    G.restore_points(G.load_grid(grid_file), elsewhere, results / "points")
    assert not G._has_models(elsewhere / "nokd-bce-avg", G.load_grid(grid_file))  # a restored point has no models
    (results / "quant.csv").unlink()
    assert G.main(["--grid", str(grid_file), "--out", str(elsewhere), "--summarise", "--results", str(results),
                   "--bootstrap", "50"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(results / "quant.csv"), table)
    with pytest.raises(G.GridError, match=r"--quantize kd-bce-T3-a0.5-avg: not a point"):
        G.run_quant_panel(G.load_grid(grid_file), teachers, out, ["kd-bce-T3-a0.5-avg"], ("int8",), results)
    with pytest.raises(G.GridError, match=r"--modes int4: choose from"):
        G.run_quant_panel(G.load_grid(grid_file), teachers, out, [], ("int4",), results)
