"""The multi-clinic yardstick: clinics chosen from the data, runs resumable, the table and paired comparisons."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from melanoma_tf import metrics as M
from melanoma_tf import synthetic
from melanoma_tf import yardstick as Y

CONFIG = REPO / "configs" / "student_mobilenetv3.yaml"


@pytest.fixture(scope="module")
def clinics_root(tmp_path_factory) -> Path:
    """A synthetic dataset whose lesions come from three 'clinics' in a column named ``clinic`` (not ``dataset``):
    clinic_a and clinic_b with many melanomas, clinic_c with a few."""
    root = synthetic.generate(tmp_path_factory.mktemp("clinics"), n_lesions=150, melanoma_fraction=0.35,
                              image_size=40, seed=11)
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    rng = np.random.default_rng(0)
    lesions = meta.drop_duplicates("lesion_id")
    clinic = {}
    for lesion, dx in zip(lesions["lesion_id"], lesions["dx"]):
        clinic[lesion] = rng.choice(["clinic_a", "clinic_b"] if dx == "mel" and rng.random() < 0.9
                                    else ["clinic_a", "clinic_b", "clinic_c"])
    meta["clinic"] = meta["lesion_id"].map(clinic)
    meta.to_csv(root / "HAM10000_metadata.csv", index=False)
    return root


def tiny(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", "data.image_size=32", "data.augment.rotation=0.0", "student.minimalistic=true",
            "student.alpha=0.75", "train.epochs=1", "train.batch_size=32", "train.verbose=0",
            "data.source_column=clinic", "data.external=[]", "output.dir=" + str(out), *extra]


def test_clinics_are_chosen_by_their_melanomas_and_bad_plans_are_refused(clinics_root, tmp_path):
    meta = pd.read_csv(clinics_root / "HAM10000_metadata.csv")
    counts = meta[meta["dx"] == "mel"].groupby("clinic").size()
    assert counts["clinic_c"] < 8 < min(counts["clinic_a"], counts["clinic_b"])
    plan = Y.make_plan(CONFIG, tiny(clinics_root, tmp_path), [1, 2], min_melanomas=8, min_reported=1)
    assert plan.clinics == ["clinic_a", "clinic_b"] and plan.reported == ["clinic_c"]
    assert plan.melanomas == {k: int(v) for k, v in counts.items()}
    assert plan.splits == ["clinic_a", "clinic_b", "random", "clinic_c"]
    assert plan.jobs()[:5] == [("clinic_a", 1), ("clinic_b", 1), ("random", 1), ("clinic_c", 1), ("clinic_a", 2)]
    command = Y.train_command(plan, tmp_path, "clinic_b", 2)
    assert command[command.index("--run-dir") + 1] == str(tmp_path / "clinic_b" / "seed2")
    assert "data.holdout_source=clinic_b" in command and "seed=2" in command and "output.evaluate=true" in command
    assert not any(c.startswith("data.holdout_source") for c in Y.train_command(plan, tmp_path, "random", 1))
    per_split = Y.make_plan(CONFIG, tiny(clinics_root, tmp_path, "distill.teacher=/t/{split}/seed*"), [1])
    assert "distill.teacher=/t/clinic_b/seed*" in Y.train_command(per_split, tmp_path, "clinic_b", 1)
    assert "distill.teacher=/t/random/seed*" in Y.train_command(per_split, tmp_path, "random", 1)
    with pytest.raises(Y.YardstickError, match=r"'clinic_x' is not a value of 'clinic'.*clinic_a"):
        Y.make_plan(CONFIG, tiny(clinics_root, tmp_path), [1], clinics=["clinic_x"])
    with pytest.raises(Y.YardstickError, match="no column 'site'"):
        Y.make_plan(CONFIG, tiny(clinics_root, tmp_path, "data.source_column=site"), [1])
    with pytest.raises(Y.YardstickError, match="named twice"):
        Y.make_plan(CONFIG, tiny(clinics_root, tmp_path), [1, 1])
    with pytest.raises(Y.YardstickError, match="chooses the holdout itself"):
        Y.make_plan(CONFIG, tiny(clinics_root, tmp_path, "data.holdout_source=clinic_a"), [1])


def test_paired_difference_is_zero_for_the_same_model_and_sees_a_better_one():
    rng = np.random.default_rng(1)
    n = 300
    y = rng.integers(0, 2, n)
    lesion = np.repeat(np.arange(n // 2), 2)
    good = [pd.DataFrame({"label": y, "lesion_id": lesion, "probability": M.sigmoid(2 * y + rng.normal(0, 1, n))},
                         index=[f"i{k}" for k in range(n)]) for _ in range(2)]
    worse = [f.assign(probability=M.sigmoid(0.5 * y + rng.normal(0, 1, n))) for f in good]
    same = Y.paired_difference(good, good, n_boot=200)
    assert same["difference"] == 0 and same["low"] == 0 and same["high"] == 0
    better = Y.paired_difference(good, worse, n_boot=300)
    expected = np.mean([M.roc_auc(y, g["probability"]) - M.roc_auc(y, w["probability"]) for g, w in zip(good, worse)])
    assert better["difference"] == pytest.approx(expected) and 0 < better["low"] < better["difference"] < better["high"]
    assert len(better["per_seed"]) == 2
    # Shuffled rows are the same predictions: pairing is by image id, not by position.
    shuffled = [w.sample(frac=1.0, random_state=3) for w in worse]
    assert Y.paired_difference(good, shuffled, n_boot=50)["difference"] == pytest.approx(expected)
    with pytest.raises(Y.YardstickError, match="different images"):
        Y.paired_difference(good, [w.iloc[1:] for w in worse], n_boot=10)


@pytest.mark.slow
def test_yardstick_end_to_end_resumes_and_compares(clinics_root, tmp_path, capsys):
    out_a, out_b = tmp_path / "avg", tmp_path / "max"
    common = ["--config", str(CONFIG), "--seeds", "1", "--clinics", "clinic_a,clinic_b", "--reported", ""]
    sets = [a for s in tiny(clinics_root, tmp_path / "runs") for a in ("--set", s)]
    assert Y.main(common + sets + ["--out", str(out_a)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"yardstick: {out_a}"
    result = json.loads((out_a / "yardstick.json").read_text())
    runs = pd.read_csv(out_a / "runs.csv").set_index("split")
    assert sorted(runs.index) == ["clinic_a", "clinic_b", "random"]
    meta = pd.read_csv(clinics_root / "HAM10000_metadata.csv")
    for clinic in ("clinic_a", "clinic_b"):  # each held-out run scored exactly that clinic's images
        predictions = pd.read_csv(out_a / clinic / "seed1" / "eval_holdout" / "predictions.csv")
        assert set(predictions["image_id"]) == set(meta.loc[meta["clinic"] == clinic, "image_id"])
        assert runs.loc[clinic, "roc_auc"] == pytest.approx(M.roc_auc(predictions["label"],
                                                                       predictions["probability"]))
    assert result["loco_mean"]["mean"] == pytest.approx(runs.loc[["clinic_a", "clinic_b"], "roc_auc"].mean())
    worst = runs.loc[["clinic_a", "clinic_b"], "roc_auc"].idxmin()
    assert result["worst_clinic"]["clinic"] == worst
    # Within-clinic ROC-AUC of the random holdout, recomputed from its predictions and the clinic column.
    pooled = pd.read_csv(out_a / "random" / "seed1" / "eval_holdout" / "predictions.csv").merge(
        meta[["image_id", "clinic"]], on="image_id")
    for clinic in ("clinic_a", "clinic_b"):
        part = pooled[pooled["clinic"] == clinic]
        if part["label"].nunique() == 2:
            assert result["within_clinic"][clinic] == pytest.approx(M.roc_auc(part["label"], part["probability"]))
    table = (out_a / "yardstick.md").read_text()
    assert "leave-one-clinic-out mean" in table and f"{result['loco_mean']['mean']:.3f}" in table
    assert str(tmp_path) not in (out_a / "yardstick.json").read_text()  # committed tables hold no machine paths

    # Run again: every run has finished, nothing trains (no new log lines), the table is the same.
    logs = {p: p.stat().st_size for p in out_a.rglob("seed*.log")}
    assert Y.main(common + sets + ["--out", str(out_a)]) == 0
    assert {p: p.stat().st_size for p in out_a.rglob("seed*.log")} == logs
    assert json.loads((out_a / "yardstick.json").read_text())["loco_mean"] == result["loco_mean"]

    # The paired comparison, against a copy whose clinic_b predictions are shuffled (a worse recipe there).
    shutil.copytree(out_a, out_b)
    degraded = out_b / "clinic_b" / "seed1" / "eval_holdout" / "predictions.csv"
    frame = pd.read_csv(degraded)
    frame["probability"] = np.random.default_rng(0).permutation(frame["probability"].to_numpy())
    frame.to_csv(degraded, index=False)
    capsys.readouterr()
    assert Y.main(["--compare", str(out_a), str(out_b), "--bootstrap", "100", "--out", str(tmp_path / "cmp")]) == 0
    compared = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert compared["splits"]["clinic_a"]["difference"] == 0 and compared["splits"]["random"]["difference"] == 0
    shuffled_auc = M.roc_auc(frame["label"], frame["probability"])
    assert compared["splits"]["clinic_b"]["difference"] == pytest.approx(runs.loc["clinic_b", "roc_auc"] - shuffled_auc)
    assert compared["loco_mean"]["difference"] == pytest.approx(compared["splits"]["clinic_b"]["difference"] / 2)
    assert compared["loco_mean"]["low"] <= compared["loco_mean"]["difference"] <= compared["loco_mean"]["high"]
    assert "leave-one-clinic-out mean" in (tmp_path / "cmp" / "compare.md").read_text()
    assert Y.main(["--compare", str(out_a), str(tmp_path)]) == 2
    assert "not a yardstick folder" in capsys.readouterr().err


def test_the_summary_averages_clinics_per_seed_and_reports_external_sets_of_the_same_models():
    rng = np.random.default_rng(5)
    plan = {"clinics": ["a", "b"], "reported": ["c"], "seeds": [1, 2, 3], "random_split": True,
            "source_column": "dataset"}
    rows = []
    for split in ("a", "b", "c", "random"):
        for seed in (1, 2, 3):
            row = {"split": split, "seed": seed, "in_mean": split in ("a", "b"), "roc_auc": rng.uniform(0.6, 0.9),
                   "roc_auc_low": 0.5, "roc_auc_high": 0.95, "n_images": 100, "n_melanoma": 20,
                   "isic2017_roc_auc": rng.uniform(0.6, 0.7), "isic2017_ece_platt": rng.uniform(0.05, 0.1)}
            if split == "random":
                row.update(within_a=rng.uniform(0.7, 0.8), within_b=rng.uniform(0.7, 0.8))
            rows.append(row)
    rows = pd.DataFrame(rows)
    summary = Y.summarise(rows, plan)
    per_seed = [rows[(rows["seed"] == s) & rows["in_mean"]]["roc_auc"].mean() for s in (1, 2, 3)]
    assert summary["loco_mean"]["mean"] == pytest.approx(np.mean(per_seed))
    assert summary["loco_mean"]["sd"] == pytest.approx(np.std(per_seed, ddof=1))
    clinic_means = {c: rows[rows["split"] == c]["roc_auc"].mean() for c in ("a", "b")}
    assert summary["worst_clinic"]["clinic"] == min(clinic_means, key=clinic_means.get)
    random_rows = rows[rows["split"] == "random"]
    assert summary["within_clinic"]["mean"] == pytest.approx(random_rows[["within_a", "within_b"]].mean(axis=1).mean())
    models = rows[rows["split"].isin(["a", "b", "random"])]  # the reported clinic's models are not in the summary
    assert summary["external"]["isic2017"]["n_models"] == 9
    assert summary["external"]["isic2017"]["roc_auc_mean"] == pytest.approx(models["isic2017_roc_auc"].mean())
    assert summary["external"]["isic2017"]["ece_platt_mean"] == pytest.approx(models["isic2017_ece_platt"].mean())
    # A seed whose clinics have not all finished is left out of the mean, not averaged over fewer clinics.
    partial = Y.summarise(rows.drop(index=rows[(rows["split"] == "b") & (rows["seed"] == 3)].index), plan)
    assert partial["loco_mean"]["n_seeds"] == 2 and partial["loco_mean"]["mean"] == pytest.approx(np.mean(per_seed[:2]))
