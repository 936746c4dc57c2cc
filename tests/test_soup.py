"""Model soups: averaged weights, coefficients, a soup is a run folder, members that cannot mix are refused."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, tiny_overrides
from melanoma_tf import config as C
from melanoma_tf import models
from melanoma_tf import combine as CB
from melanoma_tf import soup as S
from melanoma_tf import train as T
from melanoma_tf.pipeline import load_images
from melanoma_tf.runs import RunError, split_frame


@pytest.fixture(scope="module")
def members(synthetic_root, tmp_path_factory):
    """Two tiny students of one recipe and split (seeds 1 and 2), and one of another width."""
    out = tmp_path_factory.mktemp("soup")

    def run(name, seed, **extra):
        cfg = C.load(REPO / "configs" / "student_mobilenetv3.yaml", tiny_overrides(synthetic_root, out, **{
            "seed": seed, "data.split_seed": 0, "train.epochs": 1, "output.name": name, **extra}))
        return T.run(cfg)

    return run("a", 1), run("b", 2), run("narrow", 1, **{"student.alpha": 0.5})


def test_a_soup_averages_every_weight_and_is_a_run_folder(members, tmp_path, capsys):
    a, b, _ = members
    soup = tmp_path / "soup"
    assert S.main(["--runs", str(a), str(b), "--out", str(soup), "--evaluate"]) == 0
    assert f"soup: {soup}" in capsys.readouterr().out
    first, second = (models.load_model(r / "model.keras").get_weights() for r in (a, b))
    averaged = models.load_model(soup / "model.keras").get_weights()
    assert len(averaged) == len(first) and any(not np.array_equal(x, y) for x, y in zip(first, second))
    for x, y, z in zip(first, second, averaged):  # kernels, biases and BatchNorm's moving statistics alike
        np.testing.assert_allclose(z, (x.astype(np.float64) + y) / 2, rtol=1e-6, atol=1e-7)
    record = json.loads((soup / "soup.json").read_text())
    assert [m["run"] for m in record["members"]] == [a.name, b.name] and record["validation"] == "shared by every member"
    assert all(len(m["model_sha256"]) == 64 and m["coefficient"] == 0.5 for m in record["members"])
    metrics = json.loads((soup / "eval_holdout" / "metrics.json").read_text())
    assert metrics["n_images"] == len(split_frame(C.load(a / "config.yaml"), a, "holdout"))
    # coefficients 1, 0: the first member itself, image by image
    assert S.main(["--runs", str(a), str(b), "--out", str(soup), "--coefficients", "3,0"]) == 0
    assert not (soup / "eval_holdout").exists(), "the scores of the previous soup are gone with it"
    images = load_images(split_frame(C.load(a / "config.yaml"), a, "val")["path"].tolist()[:16], 32)
    np.testing.assert_allclose(models.load_model(soup / "model.keras").predict(images, verbose=0),
                               models.load_model(a / "model.keras").predict(images, verbose=0), rtol=1e-5, atol=1e-6)


def test_an_ensemble_is_the_mean_of_its_members_logits_and_converts_to_one_flatbuffer(members, tmp_path, capsys):
    """--ensemble: one model whose logit is the mean of the members' (not of their weights), scored like any run
    and converted whole to fp16 (the phone's format), with the same logits as the Keras ensemble."""
    from melanoma_tf import quantize as Q
    from melanoma_tf.tflite import TFLiteModel

    a, b, narrow = members
    out = tmp_path / "ensemble"
    assert S.main(["--ensemble", "--runs", str(a), str(narrow), "--out", str(out), "--evaluate"]) == 0
    assert f"ensemble: {out}" in capsys.readouterr().out
    images = load_images(split_frame(C.load(a / "config.yaml"), a, "val")["path"].tolist()[:16], 32)
    each = [models.load_model(r / "model.keras").predict(images, verbose=0) for r in (a, narrow)]
    assert not np.allclose(each[0], each[1])
    ensemble = models.load_model(out / "model.keras")
    np.testing.assert_allclose(ensemble.predict(images, verbose=0), (each[0] + each[1]) / 2, rtol=1e-5, atol=1e-6)
    assert ensemble.count_params() == sum(models.load_model(r / "model.keras").count_params() for r in (a, narrow))
    record = json.loads((out / "soup.json").read_text())
    assert record["kind"] == "ensemble" and [m["run"] for m in record["members"]] == [a.name, narrow.name]
    metrics = json.loads((out / "eval_holdout" / "metrics.json").read_text())
    assert metrics["n_images"] == len(split_frame(C.load(a / "config.yaml"), a, "holdout"))
    folder = Q.quantize_run(out, ("fp16",), n_boot=20, latency_runs=2)
    flat = TFLiteModel(folder / "fp16.tflite").predict(images)
    np.testing.assert_allclose(flat, (each[0] + each[1]) / 2, rtol=0, atol=0.02)  # fp16 weights
    assert json.loads((folder / "fp16.json").read_text())["threshold"] > 0
    other = tmp_path / "other_size"  # a student of another input size in a run folder of the same split
    shutil.copytree(a, other)
    models.save_model(models.build_student(C.load(a / "config.yaml").student, 40), other / "model.keras")
    for runs, message in (([a], "at least two runs"), ([a, other], rf"{other}: input \(None, 40, 40, 3\)")):
        with pytest.raises(RunError, match=message):
            CB.make_ensemble(runs, tmp_path / "e2")
    assert S.main(["--ensemble", "--runs", str(a), str(b), "--out", str(tmp_path / "e3"), "--coefficients", "1,2"]) == 2
    assert "an ensemble averages its members' logits uniformly" in capsys.readouterr().err


def test_members_that_cannot_make_a_soup_are_named(members, tmp_path, capsys):
    a, b, narrow = members
    other = tmp_path / "other_holdout"
    shutil.copytree(a, other)
    splits = pd.read_csv(other / "splits.csv")
    splits.loc[splits.index[splits["split"] == "holdout"][0], "split"] = "train"
    splits.to_csv(other / "splits.csv", index=False)
    for runs, message in (([a], "at least two runs"), ([a, narrow], f"{narrow}: another architecture"),
                          ([a, other], f"{other}: another holdout")):
        with pytest.raises(RunError, match=message):
            CB.make_soup(runs, tmp_path / "soup")
    for coefficients in ([1.0], [1.0, -1.0], [0.0, 0.0], [1.0, float("nan")]):
        with pytest.raises(RunError, match="--coefficients"):
            CB.make_soup([a, b], tmp_path / "soup", coefficients)
    assert S.main(["--runs", str(a), str(b), "--out", str(tmp_path / "soup"), "--coefficients", "1,x"]) == 2
    assert "error: --coefficients 1,x: not a comma-separated list" in capsys.readouterr().err
    assert not (tmp_path / "soup").exists()


def test_the_yardstick_soup_table_sets_a_soup_beside_its_seeds_and_their_ensemble(members, tmp_path):
    import sys

    from melanoma_tf import evaluate as E
    from melanoma_tf import metrics as M

    sys.path.insert(0, str(REPO / "tools"))
    import soup_yardstick

    a, b, _ = members
    split = tmp_path / "yardstick" / "random"
    for k, run in ((1, a), (2, b)):
        shutil.copytree(run, split / f"seed{k}")
        assert E.main(["--run", str(split / f"seed{k}"), "--bootstrap", "20", "--gradcam", "0",
                       "--latency-runs", "1"]) == 0
    (tmp_path / "yardstick" / "unfinished" / "seed1").mkdir(parents=True)  # not two scored seeds: left out
    drawn = tmp_path / "yardstick" / "drawn"  # seeds that drew their own holdouts make no soup: said, not crashed
    for k in (1, 2):
        shutil.copytree(split / f"seed{k}", drawn / f"seed{k}")
    splits = pd.read_csv(drawn / "seed2" / "splits.csv")
    splits.loc[splits.index[splits["split"] == "holdout"][0], "split"] = "train"
    splits.to_csv(drawn / "seed2" / "splits.csv", index=False)
    out = tmp_path / "soups.md"
    assert soup_yardstick.main([str(tmp_path / "yardstick"), "--out", str(out), "--bootstrap", "20"]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    (row,) = record["rows"]
    assert list(record["skipped"]) == ["drawn"] and "another holdout" in record["skipped"]["drawn"]
    assert str(tmp_path) not in out.with_suffix(".json").read_text() + out.read_text()
    cell = row["holdout"]
    frames = [pd.read_csv(split / f"seed{k}" / "eval_holdout" / "predictions.csv") for k in (1, 2)]
    assert cell["ensemble"] == pytest.approx(M.roc_auc(frames[0]["label"], (frames[0]["logit"] + frames[1]["logit"]) / 2))
    assert cell["seeds_mean"] == pytest.approx(np.mean([M.roc_auc(f["label"], f["logit"]) for f in frames]))
    soup = json.loads((split / "soup" / "eval_holdout" / "metrics.json").read_text())
    assert cell["soup"] == soup["roc_auc"] and row["split"] == "random" and row["seeds"] == ["seed1", "seed2"]
    assert f"| random | its holdout ({cell['n_images']}) | {cell['seeds_mean']:.3f}" in out.read_text()
