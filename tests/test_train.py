"""The train command: run folder contract, chained stages, errors, resume after a kill (learnability: test_quantize)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, tiny_overrides
from melanoma_tf import config as C
from melanoma_tf import runs
from melanoma_tf import train as T

QUICKSTART = REPO / "configs" / "quickstart.yaml"
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}


def cli(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "melanoma_tf.train", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=900, **kwargs)


def sets(overrides):
    out = []
    for item in overrides:
        out += ["--set", item]
    return out


def check_stage_folder(folder: Path, epochs: int):
    for name in ("config.yaml", "splits.csv", "splits.json", "history.csv", "history.png", "metrics.json",
                 "model.keras", "best.weights.h5", "state.json"):
        assert (folder / name).is_file(), f"{folder}/{name} missing"
    assert (folder / "tensorboard").is_dir()
    splits = pd.read_csv(folder / "splits.csv")
    assert list(splits.columns) == ["image_id", "lesion_id", "label", "split"]
    assert set(splits["split"]) == {"train", "val", "holdout"}
    assert (splits.groupby("lesion_id")["split"].nunique() == 1).all()
    history = pd.read_csv(folder / "history.csv")
    assert history["epoch"].tolist() == list(range(1, epochs + 1))
    assert {"loss", "val_roc_auc", "val_pr_auc", "val_loss", "seconds", "lr"} <= set(history.columns)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert 0.0 <= metrics["val_roc_auc"] <= 1.0 and 0.0 <= metrics["val_pr_auc"] <= 1.0
    best = history.loc[history["val_roc_auc"].idxmax()]
    assert metrics["val_roc_auc"] == pytest.approx(best["val_roc_auc"])
    assert metrics["best_epoch"] == int(best["epoch"])
    return splits, history, metrics


@pytest.mark.slow
def test_chained_run_cli_contract(synthetic_root, tmp_path):
    # MobileNetV2 as the teacher: the chain's wiring does not depend on which (ResNet50, the quickstart's,
    # is trained in test_frozen_teacher_then_finetune_top_block; here it only made the test 100 s slower).
    overrides = tiny_overrides(synthetic_root, tmp_path, **{"teacher.epochs": 1, "distill.teacher_outputs": "cached",
                                                            "teacher.arch": "mobilenet_v2"})
    result = cli(["--config", str(QUICKSTART), *sets(overrides)])
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("run: ")
    run_dir = Path(last[len("run: "):])
    assert run_dir.parent == tmp_path and run_dir.name.startswith("quickstart-")
    resolved = C.load(run_dir / "config.yaml")
    assert resolved.data.image_size == 32 and resolved.train.epochs == 2 and resolved.stages == (
        "teacher", "student", "distill")
    hashes = set()
    for stage, epochs in (("teacher", 1), ("student", 2), ("distill", 2)):
        splits, _, metrics = check_stage_folder(run_dir / stage, epochs)
        hashes.add(metrics["splits_sha256"])
    assert len(hashes) == 1, "every stage must train on the same split"
    assert (run_dir / "distill" / "teacher_logits.npz").is_file()
    top = json.loads((run_dir / "metrics.json").read_text())
    assert set(top["stages"]) == {"teacher", "student", "distill"}
    from melanoma_tf.models import load_model

    teacher = load_model(run_dir / "teacher" / "model.keras")
    student = load_model(run_dir / "distill" / "model.keras")
    assert resolved.teacher.arch == "mobilenet_v2" and teacher.count_params() > 2 * student.count_params()
    # output.evaluate (the quickstart's): a holdout report per stage, then one comparison of the three
    for stage in ("teacher", "student", "distill"):
        assert (run_dir / stage / "eval_holdout" / "report.md").is_file()
    compare = pd.read_csv(run_dir / "compare" / "compare.csv")
    assert len(compare) == 3 and compare["roc_auc"].between(0, 1).all()

    # Killed before the last stage finished (its metrics.json is the stage's commit point), then resumed: the
    # finished stages are not run again, the last one is completed.
    (run_dir / "distill" / "metrics.json").unlink()
    finished = {stage: (run_dir / stage / "model.keras").stat().st_mtime_ns for stage in ("teacher", "student")}
    resumed = cli(["--config", str(QUICKSTART), *sets(overrides), "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {stage: (run_dir / stage / "model.keras").stat().st_mtime_ns for stage in finished} == finished
    assert (run_dir / "distill" / "metrics.json").is_file()
    assert resumed.stdout.strip().splitlines()[-1] == f"run: {run_dir}"


def test_cli_errors_exit_nonzero_and_name_the_problem(tmp_path, synthetic_root, capsys):
    bad_key = cli(["--config", str(QUICKSTART), "--set", "train.epoch=3"])  # the real process, once
    assert bad_key.returncode != 0 and "train.epoch" in bad_key.stderr and "train.epochs" in bad_key.stderr
    assert "Traceback" not in bad_key.stderr

    def in_process(args):  # the same main() the process runs, without importing TensorFlow three more times
        code = T.main(args)
        return code, capsys.readouterr().err

    code, err = in_process(["--config", str(QUICKSTART), "--set", f"data.root={tmp_path / 'nowhere'}",
                            "--set", f"output.dir={tmp_path}"])
    assert code != 0 and "nowhere" in err
    code, err = in_process(["--config", str(tmp_path / "none.yaml")])
    assert code != 0 and "none.yaml" in err
    code, err = in_process(["--config", str(QUICKSTART), "--resume", "--set", f"output.dir={tmp_path}"])
    assert code != 0 and "no earlier run" in err


def test_resume_refuses_a_different_config(synthetic_root, tmp_path):
    cfg = C.from_dict({"data": {"root": str(synthetic_root)}, "output": {"dir": str(tmp_path), "name": "x"}})
    run_dir = runs.new_run_dir(cfg)
    C.save(cfg, run_dir / "config.yaml")
    assert runs.find_resumable(cfg, None) == run_dir
    changed = C.replace(cfg, "train.lr", 0.5)
    with pytest.raises(C.ConfigError, match=r"train\.lr"):
        runs.find_resumable(changed, None)
    assert runs.find_resumable(C.replace(cfg, "train.verbose", 0), str(run_dir)) == run_dir


@pytest.mark.slow
def test_resume_after_kill_mid_training(synthetic_root, tmp_path):
    epochs = 4
    overrides = tiny_overrides(synthetic_root, tmp_path, **{"train.epochs": epochs, "train.verbose": 2,
                                                            "data.augment.rand_augment": True})
    args = ["--config", str(REPO / "configs" / "student_mobilenetv3.yaml"), *sets(overrides)]
    proc = subprocess.Popen([sys.executable, "-m", "melanoma_tf.train", *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state_files = []
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        state_files = list(tmp_path.glob("student_mobilenetv3-*/state.json"))
        if state_files and json.loads(state_files[0].read_text()).get("epoch", 0) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed:\n" + proc.stdout.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = state_files[0].parent
    state = json.loads((run_dir / "state.json").read_text())
    done = state["epoch"]
    assert 2 <= done < epochs
    before = pd.read_csv(run_dir / "history.csv")
    assert before["epoch"].tolist() == list(range(1, done + 1))
    assert not (run_dir / "model.keras").exists() and not (run_dir / "metrics.json").exists()

    result = cli(args + ["--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"run: {run_dir}"
    assert f"resuming stage student from epoch {done}" in result.stderr
    epochs_printed = [line for line in result.stdout.splitlines() if line.startswith("Epoch ")]
    assert epochs_printed[0] == f"Epoch {done + 1}/{epochs}", epochs_printed
    _, after, _ = check_stage_folder(run_dir, epochs)
    pd.testing.assert_frame_equal(after.iloc[:done].reset_index(drop=True), before, check_dtype=False)


def test_checkpoint_restores_model_and_optimizer(tmp_path):
    from melanoma_tf import callbacks as cb
    from melanoma_tf.backend import keras

    def model():
        keras.utils.set_random_seed(1)
        inp = keras.Input((4,))
        return keras.Model(inp, keras.layers.Dense(1)(inp))

    first = model()
    opt = keras.optimizers.Adam(1e-2)
    first.compile(optimizer=opt, loss="mse")
    x, y = np.random.default_rng(0).normal(size=(32, 4)), np.ones((32, 1))
    check = cb.EpochCheckpoint(tmp_path, first, opt, "train")

    class FakeAuc(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs[cb.MONITOR] = 0.5 + 0.1 * epoch

    first.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[FakeAuc(), check])
    state = cb.load_state(tmp_path)
    assert state["epoch"] == 2 and state["best_epoch"] == 2 and state["checkpoint"] == "epoch-2"
    second = model()
    opt2 = keras.optimizers.Adam(1e-2)
    assert not np.allclose(second.get_weights()[0], first.get_weights()[0])
    cb.restore_checkpoint(tmp_path, state, second, opt2)
    for a, b in zip(second.get_weights(), first.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(opt2.iterations.numpy()) == int(opt.iterations.numpy()) == 8


@pytest.mark.slow
def test_frozen_teacher_then_finetune_top_block(synthetic_root, tmp_path):
    overrides = tiny_overrides(synthetic_root, tmp_path, **{
        "teacher.mode": "frozen", "teacher.epochs": 1, "teacher.finetune_blocks": 1, "teacher.finetune_epochs": 1,
        "teacher.finetune_lr": 1e-3, "train.lr_schedule": "constant"})
    cfg = C.load(REPO / "configs" / "teacher_resnet50.yaml", overrides)
    from melanoma_tf.backend import set_global_seed
    from melanoma_tf.models import build_teacher, load_model

    set_global_seed(cfg.seed)
    keras_seeded = build_teacher(cfg.teacher, 32)  # same seed: the initial weights of the run
    run_dir = T.run(cfg)
    history = pd.read_csv(run_dir / "history.csv")
    assert history["phase"].tolist() == ["head", "finetune"]
    assert history["lr"].iloc[1] == pytest.approx(1e-3)
    trained = load_model(run_dir / "model.keras")
    changed = lambda name: not np.allclose(trained.get_layer(name).get_weights()[0],  # noqa: E731
                                           keras_seeded.get_layer(name).get_weights()[0])
    assert changed("logits")
    assert not changed("conv5_block2_3_conv") and not changed("conv1_conv")
    # The epoch-2 checkpoint (the end of the fine-tune phase, whichever epoch was best): the top block moved,
    # the blocks below it did not.
    from melanoma_tf import callbacks as cb

    state = cb.load_state(run_dir)
    assert state["epoch"] == 2 and state["checkpoint"] == "epoch-2"
    epoch_2 = build_teacher(cfg.teacher, 32)
    assert cb.restore_checkpoint(run_dir, state, epoch_2)
    moved = lambda name: not np.allclose(epoch_2.get_layer(name).get_weights()[0],  # noqa: E731
                                         keras_seeded.get_layer(name).get_weights()[0])
    assert moved("conv5_block3_3_conv") and moved("logits")
    assert not moved("conv5_block2_3_conv") and not moved("conv1_conv")


@pytest.mark.slow
def test_multiclass_run_and_evaluation(synthetic_root, tmp_path):
    overrides = tiny_overrides(synthetic_root, tmp_path, **{"data.labels": "multiclass", "loss.name": "wbce",
                                                            "train.epochs": 1})
    cfg = C.load(REPO / "configs" / "student_mobilenetv3.yaml", overrides)
    run_dir = T.run(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"val_roc_auc", "val_pr_auc", "val_bma"} <= set(metrics)
    from melanoma_tf import evaluation as E
    from melanoma_tf.models import load_model

    assert load_model(run_dir / "model.keras").output_shape == (None, 7)
    report = E.evaluate(str(run_dir), n_boot=20, gradcam=1, latency_runs=50)
    result = json.loads((report.parent / "metrics.json").read_text())
    mc = result["multiclass"]
    assert len(mc["confusion_matrix"]) == 7 and 0 <= mc["bma"] <= 1
    holdout = pd.read_csv(run_dir / "splits.csv").query("split == 'holdout'")
    assert sum(map(sum, mc["confusion_matrix"])) == len(holdout)
    assert result["n_melanoma"] == int((holdout["label"] == 4).sum())  # melanoma vs rest from P(mel)
    # Each image's seven class probabilities and its arg-max class, the ones the confusion matrix counts.
    predictions = pd.read_csv(report.parent / "predictions.csv")
    classes = [f"p_{name}" for name in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")]
    np.testing.assert_allclose(predictions[classes].sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(predictions["p_mel"], predictions["probability"], atol=1e-6)
    assert list(predictions["predicted_class"]) == [classes[k][2:] for k in predictions[classes].to_numpy().argmax(1)]
    truth = predictions["label"].to_numpy()
    called = predictions["predicted_class"].map({c[2:]: k for k, c in enumerate(classes)}).to_numpy()
    assert [[int(((truth == i) & (called == j)).sum()) for j in range(7)] for i in range(7)] == \
        mc["confusion_matrix"]
    # An external set is labelled melanoma 1 / other 0 even for a multiclass model (ISIC 2017 is).
    labels = tmp_path / "external.csv"
    holdout.assign(label=(holdout["label"] == 4).astype(int))[["image_id", "label"]].to_csv(labels, index=False)
    external = E.evaluate(str(run_dir), images=str(synthetic_root / "images"), labels=str(labels), n_boot=10,
                          gradcam=0, latency_runs=2, relation=False, melanoma_labels=True,
                          out=str(tmp_path / "ext"))
    ext = json.loads((external.parent / "metrics.json").read_text())
    assert ext["n_melanoma"] == int((holdout["label"] == 4).sum()) and ext["roc_auc"] == pytest.approx(
        result["roc_auc"], abs=1e-6)  # the same images, the same P(mel)


def test_early_stopping_on_validation_auc(tmp_path):
    from melanoma_tf import callbacks as cb
    from melanoma_tf.backend import keras

    inp = keras.Input((2,))
    model = keras.Model(inp, keras.layers.Dense(1)(inp))
    opt = keras.optimizers.Adam()
    model.compile(optimizer=opt, loss="mse")
    scores = [0.6, 0.7, 0.65, 0.68, 0.69, 0.9]

    class FakeAuc(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs[cb.MONITOR] = scores[epoch]

    history = model.fit(np.zeros((4, 2)), np.zeros((4, 1)), epochs=6, verbose=0,
                        callbacks=[FakeAuc(), cb.EpochCheckpoint(tmp_path, model, opt, "train", patience=3)])
    assert len(history.epoch) == 5  # best at epoch 2, three epochs without improvement
    state = cb.load_state(tmp_path)
    assert state["best_epoch"] == 2 and state["best"] == 0.7 and state["stopped_phase"] == "train"
    assert pd.read_csv(tmp_path / "history.csv")["epoch"].tolist() == [1, 2, 3, 4, 5]


def test_a_deterministic_run_trains_the_same_weights_twice(synthetic_root, tmp_path):
    """train.deterministic: the same seed gives the same weights, augmentation included; another seed does not."""
    from melanoma_tf import models

    def weights(name, seed):
        cfg = C.load(REPO / "configs" / "student_mobilenetv3.yaml", tiny_overrides(synthetic_root, tmp_path, **{
            "train.deterministic": True, "seed": seed, "data.split_seed": 0, "output.name": name,
            "data.augment.rotation": 0.2, "train.epochs": 1}))
        return models.load_model(T.run(cfg) / "model.keras").get_weights()

    first, again, other = weights("a", 3), weights("b", 3), weights("c", 4)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not all(np.array_equal(x, y) for x, y in zip(first, other))
