"""The reference run: teacher, no-KD students, distilled student, QAT int8, baselines, one holdout.

    python tools/reference_run.py --config configs/reference_ham10000.yaml [--set key=value ...]

Every step is an ordinary command of the package run in its own process, in a
fixed folder under ``output.dir`` of the config, so the run is resumable: run
the same command again after a crash and finished steps are skipped, a killed
training continues from its last epoch. At the end the summary is assembled in
``--results`` (default ``results/<config name>``): ``report.md``,
``metrics.json``, the comparison plots, ``student_int8.tflite`` (the microcontroller's),
``student_fp16.tflite`` (the fp16 student) and ``tiny_student_int8.tflite`` (512 KB-class boards), each with
its sidecar and evaluation, and the run's ``splits.csv``; the phone app's model folder
(``--app-model``, default ``app/public/model``) gets the phone ensemble's members. The last line
printed is ``reference: <results folder>``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from melanoma_tf import config as cfgmod  # noqa: E402
from melanoma_tf.files import write_atomic, write_json  # noqa: E402
from ship_model import ship  # noqa: E402  (tools/ is on the path when this script runs)



@dataclass
class Step:
    name: str
    argv: list[str]
    done: Path  # exists once the step has finished


TINY_CONFIG = "distill_mobilenetv3_tiny.yaml"
PHONE_APP = "phone_app"  # the app's model folder as export_app writes it; copied to --app-model at the end


def teacher_configs(names: str) -> dict[str, Optional[str]]:
    """``--teachers``: {step name: config file}, for a comma-separated list of names.

    ``teacher`` is the run's config with its own teacher section (no file of its own); any other name is a config
    file next to the run's config (``teacher_efficientnet_lite0`` is ``teacher_efficientnet_lite0.yaml``), which
    starts from it with ``base:``. An empty list trains no separate teacher: the students are then distilled from
    the ensemble of the no-KD students.
    """
    found = [n.strip().removesuffix(".yaml") for n in names.split(",") if n.strip()]
    if len(set(found)) != len(found):
        raise ValueError(f"--teachers {names}: a teacher is named twice")
    return {name: None if name == "teacher" else f"{name}.yaml" for name in found}


def plan(config: Path, overrides: list[str], out: Path, teacher_size: int, seeds: list[int],
         qat_epochs: int, bootstrap: int, teachers: Optional[dict[str, Optional[str]]] = None) -> list[Step]:
    """The commands of the reference run, in order.

    The ``teachers`` ({step name: config file next to ``config``, None for its own teacher section; see
    ``teacher_configs``), each at ``teacher_size``; one no-KD student per seed; one distilled student per seed,
    each taught by the ensemble of the teachers and the no-KD students (cached mean logits, each member at its
    own resolution); QAT int8 of the first distilled student; the edge-class student; the baselines on the same
    split.
    """
    teachers = teachers or {}
    for name, teacher_config in teachers.items():
        if teacher_config is not None and not (config.parent / teacher_config).is_file():
            raise FileNotFoundError(f"--teachers {name}: no config {config.parent / teacher_config}")
    py = [sys.executable, "-m"]
    sets = [a for o in overrides for a in ("--set", o)]
    base = ["--config", str(config)] + sets
    train = py + ["melanoma_tf.train"] + base + ["--set", "output.evaluate=true"]
    steps = []
    for name, teacher_config in teachers.items():
        argv = (train if teacher_config is None else
                py + ["melanoma_tf.train", "--config", str(config.parent / teacher_config)] + sets
                + ["--set", "output.evaluate=true"])
        steps.append(Step(name, argv + ["--set", "stages=[teacher]", "--set", f"data.image_size={teacher_size}",
                                        "--run-dir", str(out / name)],
                          out / name / "eval_holdout" / "metrics.json"))
    for seed in seeds:
        folder = out / f"student_seed{seed}"
        steps.append(Step(f"student_seed{seed}", train + ["--set", "stages=[student]", "--set", f"seed={seed}",
                                                          "--run-dir", str(folder)],
                          folder / "eval_holdout" / "metrics.json"))
    members = [str(out / name) for name in teachers] + [str(out / f"student_seed{s}") for s in seeds]
    # Validation predictions of every ensemble member: is their mean clearly better than the best student alone?
    for folder in map(Path, members):
        steps.append(Step(f"{folder.name}_on_validation",
                          py + ["melanoma_tf.evaluate", "--run", str(folder), "--split", "val", "--no-external",
                                "--out", str(folder / "eval_val"), "--gradcam", "0", "--bootstrap", "200",
                                "--latency-runs", "5"],
                          folder / "eval_val" / "metrics.json"))
    for seed in seeds:
        folder = out / f"distill_seed{seed}"
        steps.append(Step(f"distill_seed{seed}", train + ["--set", "stages=[distill]", "--set", f"seed={seed}",
                                                          "--set", f"distill.teacher=[{', '.join(members)}]",
                                                          "--run-dir", str(folder)],
                          folder / "eval_holdout" / "metrics.json"))
    first = out / f"distill_seed{seeds[0]}"
    steps.append(Step("quantize", py + ["melanoma_tf.quantize", "--run", str(first), "--modes",
                                        "fp32,fp16,int8,qat", "--qat-epochs", str(qat_epochs),
                                        "--bootstrap", str(bootstrap)],
                      first / "tflite" / "qat.json"))
    for mode in ("int8", "qat"):  # which int8 model ships is decided on validation, never on the holdout
        steps.append(Step(f"{mode}_on_validation", py + ["melanoma_tf.evaluate", "--run", str(first), "--model",
                                                         str(first / "tflite" / f"{mode}.tflite"), "--split", "val",
                                                         "--out", str(first / "tflite" / f"eval_val_{mode}"),
                                                         "--gradcam", "0", "--bootstrap", "200"],
                          first / "tflite" / f"eval_val_{mode}" / "metrics.json"))
    # The edge-class student (configs/distill_mobilenetv3_tiny.yaml): width 0.5, 128 px, the same teacher ensemble.
    tiny = out / "tiny_student"
    steps.append(Step("tiny_student", py + ["melanoma_tf.train", "--config", str(config.parent / TINY_CONFIG),
                                            "--set", f"distill.teacher=[{', '.join(members)}]",
                                            "--set", "output.evaluate=true", "--run-dir", str(tiny)],
                      tiny / "eval_holdout" / "metrics.json"))
    steps.append(Step("tiny_quantize", py + ["melanoma_tf.quantize", "--run", str(tiny), "--modes", "fp32,int8",
                                             "--bootstrap", str(bootstrap)],
                      tiny / "tflite" / "int8.json"))
    # The phone's model: the no-KD students' mean-logit ensemble as one fp16 flatbuffer (about 2 MB per member,
    # within the phone's 25 MB), evaluated as one file; the app gets it as its members' fp16 files (each under the
    # repository's 5 MB per-file limit), which export_app checks to average to the evaluated ensemble's logit.
    phone = out / "phone_ensemble"
    steps.append(Step("phone_ensemble", py + ["melanoma_tf.soup", "--ensemble", "--runs",
                                              *[str(out / f"student_seed{s}") for s in seeds], "--out", str(phone)],
                      phone / "soup.json"))
    steps.append(Step("phone_quantize", py + ["melanoma_tf.quantize", "--run", str(phone), "--modes", "fp16",
                                              "--bootstrap", str(bootstrap)],
                      phone / "tflite" / "fp16.json"))
    for seed in seeds:
        folder = out / f"student_seed{seed}"
        steps.append(Step(f"phone_member_seed{seed}", py + ["melanoma_tf.quantize", "--run", str(folder), "--modes",
                                                           "fp16", "--bootstrap", str(bootstrap)],
                          folder / "tflite" / "fp16.json"))
    steps.append(Step("phone_app", py + ["melanoma_tf.export_app", "--model", str(phone / "tflite" / "fp16.tflite"),
                                         "--members", *[str(out / f"student_seed{s}" / "tflite" / "fp16.tflite")
                                                        for s in seeds], "--out", str(out / PHONE_APP)],
                      out / PHONE_APP / "app.json"))
    steps.append(Step("baselines", py + ["melanoma_tf.baselines"] + base +
                      ["--set", f"output.dir={out}", "--set", "output.name=baselines", "--run", str(first),
                       "--bootstrap", str(bootstrap)],
                      out / "baselines.done"))
    return steps


def run_steps(steps: list[Step], out: Path) -> dict:
    """Runs the steps not yet done; returns {step: seconds} (this and earlier invocations)."""
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    for step in steps:
        if step.done.is_file():
            print(f"== {step.name}: done already", flush=True)
            continue
        print(f"== {step.name}: {' '.join(step.argv)}", flush=True)
        start = time.time()
        subprocess.run(step.argv, check=True, cwd=ROOT)
        timings[step.name] = timings.get(step.name, 0.0) + time.time() - start
        if step.name == "baselines":
            write_atomic(step.done, _newest(out, "baselines-*") .name + "\n")
        write_json(timings_path, timings)
    order = [step.name for step in steps]  # the file's keys are sorted; the report lists steps as they run
    return dict(sorted(timings.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def _newest(folder: Path, pattern: str) -> Path:
    found = sorted(p for p in folder.glob(pattern) if p.is_dir())
    if not found:
        raise FileNotFoundError(f"{folder}: nothing matches {pattern}")
    return found[-1]


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def _external(metrics: dict, name: str, key: str) -> Optional[float]:
    value = (metrics.get("external") or {}).get(name, {}).get(key)
    return None if value is None else float(value)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def install_app_model(source: Path, target: Path) -> None:
    """``target`` (the app's model folder) becomes export_app's output ``source``: its model files, sidecar and
    app.json replace the old ones, each checked before and after the copy."""
    from melanoma_tf.export_app import APP_INFO, APP_SIDECAR, read_app_folder

    read_app_folder(source)
    target.mkdir(parents=True, exist_ok=True)
    new = sorted(source.iterdir())
    for path in new:  # each file replaced whole; the old model files go only once every new one is in place
        write_atomic(target / path.name, path.read_bytes())
    for old in [*target.glob("*.tflite"), target / APP_SIDECAR, target / APP_INFO]:
        if old.name not in {p.name for p in new}:
            old.unlink(missing_ok=True)
    read_app_folder(target)


def assemble(out: Path, results: Path, seeds: list[int], timings: dict, command: str,
             external: str = "isic2017", bootstrap: int = 1000, teachers: tuple[str, ...] = ()) -> dict:
    """Writes the results folder from the finished run (``teachers``: their step names); returns the summary."""
    from melanoma_tf import report

    baselines = out / (out / "baselines.done").read_text().strip()
    first = out / f"distill_seed{seeds[0]}"
    teachers = {_teacher_label(name): out / name for name in teachers
                if (out / name / "eval_holdout" / "metrics.json").is_file()}
    evaluations = {label: folder / "eval_holdout" for label, folder in teachers.items()}
    evaluations.update({f"student no-KD seed {s}": out / f"student_seed{s}" / "eval_holdout" for s in seeds})
    evaluations.update({f"distilled student seed {s}": out / f"distill_seed{s}" / "eval_holdout" for s in seeds})
    # The int8 model that ships: QAT or post-training int8, whichever scores higher on validation.
    val_auc = {mode: _metrics(first / "tflite" / f"eval_val_{mode}")["roc_auc"] for mode in ("qat", "int8")
               if (first / "tflite" / f"eval_val_{mode}" / "metrics.json").is_file()}
    shipped = max(val_auc, key=val_auc.get) if val_auc else "qat"
    evaluations["distilled student QAT int8 (TFLite)"] = first / "tflite" / "eval_qat"
    evaluations["distilled student PTQ int8 (TFLite)"] = first / "tflite" / "eval_int8"
    evaluations["distilled student fp16 (TFLite)"] = first / "tflite" / "eval_fp16"
    tiny_name = "tiny student int8 (TFLite, width 0.5, 128 px)"
    evaluations[tiny_name] = out / "tiny_student" / "tflite" / "eval_int8"
    evaluations[f"phone ensemble fp16 (TFLite, {len(seeds)} no-KD students)"] = \
        out / "phone_ensemble" / "tflite" / "eval_fp16"
    for name in ("logreg", "hgb", "rf"):
        if (baselines / name / "eval_holdout" / "metrics.json").is_file():
            evaluations[f"baseline {name}"] = baselines / name / "eval_holdout"
    evaluations = {k: v for k, v in evaluations.items() if (v / "metrics.json").is_file()}
    metrics = {name: _metrics(folder) for name, folder in evaluations.items()}

    results.mkdir(parents=True, exist_ok=True)
    compare_dir = out / "compare"
    report.compare([str(f) for f in evaluations.values()], str(compare_dir))
    shipped_name = {"qat": "distilled student QAT int8 (TFLite)", "int8": "distilled student PTQ int8 (TFLite)"}
    qat = metrics[shipped_name[shipped]]
    no_kd = {s: metrics[f"student no-KD seed {s}"] for s in seeds}
    kd = {s: metrics[f"distilled student seed {s}"] for s in seeds}
    baseline_names = [n for n in metrics if n.startswith("baseline")]
    best_baseline = max((m["roc_auc"], n) for n, m in metrics.items() if n in baseline_names)
    best_baseline_ext = max(((_external(metrics[n], external, "roc_auc") or 0.0), n) for n in baseline_names)
    qat_ext = _external(qat, external, "roc_auc")
    gains = {where: [(_external(kd[s], external, "roc_auc") if where == external else kd[s]["roc_auc"])
                     - (_external(no_kd[s], external, "roc_auc") if where == external else no_kd[s]["roc_auc"])
                     for s in seeds if where != external or _external(kd[s], external, "roc_auc") is not None]
             for where in ("holdout", external)}
    float_auc = kd[seeds[0]]["roc_auc"]
    teacher_vals = {label: _metrics(folder)["val_roc_auc"] for label, folder in teachers.items()}
    best_teacher = max(teacher_vals, key=teacher_vals.get) if teacher_vals else None
    # what the students were distilled from: the ensemble of the teachers (if any) and the no-KD students, with TTA
    distill_stage = out / f"distill_seed{seeds[0]}" / "metrics.json"  # recorded since the distill stage scores it
    distill_teacher_val = (json.loads(distill_stage.read_text()).get("teacher_val_roc_auc")
                           if distill_stage.is_file() else None)
    student_val = max(_metrics(out / f"student_seed{s}")["val_roc_auc"] for s in seeds)
    margin = _teacher_margin([folder for folder in teachers.values()] + [out / f"student_seed{s}" for s in seeds],
                             [out / f"student_seed{s}" for s in seeds], bootstrap)
    checks = [
        ("int8 holdout ROC-AUC", qat["roc_auc"], ">= 0.93", qat["roc_auc"] >= 0.93),
        ("int8 holdout specificity at the validation-chosen 95%-sensitivity threshold", qat["specificity"],
         ">= 0.70", qat["specificity"] >= 0.70),
        ("int8 holdout sensitivity at that threshold", qat["sensitivity"], ">= 0.90", qat["sensitivity"] >= 0.90),
        (f"int8 ROC-AUC minus the best baseline ({best_baseline[1]}, {best_baseline[0]:.3f}), holdout",
         qat["roc_auc"] - best_baseline[0], "> 0", qat["roc_auc"] > best_baseline[0]),
        (f"int8 vs float ROC-AUC gap, holdout (float distilled seed {seeds[0]}: {float_auc:.3f})",
         abs(qat["roc_auc"] - float_auc), "<= 0.01", abs(qat["roc_auc"] - float_auc) <= 0.01),
        *([(f"best teacher ({best_teacher}) minus the best no-KD student, validation ROC-AUC",
            teacher_vals[best_teacher] - student_val, "> 0.01", teacher_vals[best_teacher] - student_val > 0.01)]
          if best_teacher else []),
        *([("distillation teacher (ensemble, TTA) minus the best no-KD student, validation ROC-AUC",
            distill_teacher_val - student_val, "> 0.01", distill_teacher_val - student_val > 0.01)]
          if distill_teacher_val is not None else []),
        *([("distillation teacher (mean logit, no TTA) minus the best no-KD student, validation ROC-AUC: lower "
            "end of the paired 95% bootstrap interval", margin["ci"][0], "> 0", margin["ci"][0] > 0)]
          if margin else []),
        ("distilled minus no-KD, holdout ROC-AUC (mean of seeds)", float(np.mean(gains["holdout"])), "> 0",
         float(np.mean(gains["holdout"])) > 0),
    ]
    if tiny_name in metrics:
        tiny = metrics[tiny_name]
        tiny_sidecar = json.loads((out / "tiny_student" / "tflite" / "int8.json").read_text())
        checks += [
            ("tiny student int8 flatbuffer, KB", tiny_sidecar["size_bytes"] / 1024, "<= 512",
             tiny_sidecar["size_bytes"] <= 512 * 1024),
            ("tiny student TFLite-Micro arena, KB", (tiny_sidecar.get("tflm_arena_bytes") or 0) / 1024, "<= 256",
             0 < (tiny_sidecar.get("tflm_arena_bytes") or 0) <= 256 * 1024),
            ("tiny minus shipped int8, holdout ROC-AUC", tiny["roc_auc"] - qat["roc_auc"], ">= -0.02",
             tiny["roc_auc"] - qat["roc_auc"] >= -0.02),
        ]
    if qat_ext is not None:
        ext_ece = _external(qat, external, "ece_platt")
        checks += [
            (f"int8 {external} ROC-AUC", qat_ext, ">= 0.75", qat_ext >= 0.75),
            (f"int8 {external} ROC-AUC minus the best baseline there ({best_baseline_ext[1]}, "
             f"{best_baseline_ext[0]:.3f})", qat_ext - best_baseline_ext[0], ">= 0.10",
             qat_ext - best_baseline_ext[0] >= 0.10),
            (f"int8 {external} ECE after the stored (validation-fitted Platt) calibration", ext_ece, "<= 0.10",
             ext_ece is not None and ext_ece <= 0.10),
            (f"distilled minus no-KD, {external} ROC-AUC (mean of seeds)", float(np.mean(gains[external])), "> 0",
             float(np.mean(gains[external])) > 0),
        ]
    ensemble_auc = _ensemble_auc([evaluations[label] for label in teachers]
                                 + [evaluations[f"student no-KD seed {s}"] for s in seeds])
    keys = ("roc_auc", "roc_auc_ci", "pr_auc", "pr_auc_ci", "threshold", "sensitivity", "specificity", "ppv", "npv",
            "f1", "ece", "ece_platt", "brier", "params", "size_mb", "latency_ms_median", "n_images")
    summary = {
        "command": command,
        "shipped_int8": {"mode": shipped, "validation_roc_auc": val_auc},
        "teacher_val_roc_auc": teacher_vals, "best_student_val_roc_auc": student_val,
        "distillation_teacher_val_roc_auc": distill_teacher_val,
        "distillation_teacher_val_margin": margin,
        "teacher_ensemble_holdout_roc_auc": ensemble_auc,
        "models": {name: {**{k: m.get(k) for k in keys},
                          "external": {e: {k: v for k, v in d.items() if k != "folder"}
                                       for e, d in (m.get("external") or {}).items()}}
                   for name, m in metrics.items()},
        "no_kd_roc_auc_mean_std": _mean_std([m["roc_auc"] for m in no_kd.values()]),
        "kd_roc_auc_mean_std": _mean_std([m["roc_auc"] for m in kd.values()]),
        "kd_gain_mean_std": {where: _mean_std(v) for where, v in gains.items() if v},
        "targets": [{"target": t, "value": None if v is None else float(v), "goal": g, "met": bool(ok)}
                    for t, v, g, ok in checks],
        "seconds": timings,
    }
    write_json(results / "metrics.json", summary)
    for name in ("roc.png", "auc_vs_size.png", "auc_vs_latency.png"):
        if (compare_dir / name).is_file():
            shutil.copyfile(compare_dir / name, results / name)
    qat_eval = first / "tflite" / f"eval_{shipped}"
    for png in sorted(qat_eval.glob("*.png")):
        shutil.copyfile(png, results / f"student_int8_{png.name}")
    ship(first, shipped, qat_eval, results, "student_int8", command)
    # The phone app runs the fp16 student: float arithmetic gives the same score in every runtime, while
    # int8 kernels (XNNPACK on x86 or WebAssembly, TFLite's reference ones) differ by several output steps.
    ship(first, "fp16", first / "tflite" / "eval_fp16", results, "student_fp16", command)
    # The edge-class student, so a 512 KB-class board can be flashed without retraining.
    tiny = out / "tiny_student"
    if (tiny / "tflite" / "int8.tflite").is_file():
        ship(tiny, "int8", tiny / "tflite" / "eval_int8", results, "tiny_student_int8", command)
    # The phone app's ensemble: its sidecar and evaluation; the file itself (over the repository's 5 MB per-file
    # limit) ships as its members' files in the app (install_app_model).
    phone = out / "phone_ensemble"
    if (phone / "tflite" / "fp16.tflite").is_file():
        ship(phone, "fp16", phone / "tflite" / "eval_fp16", results, "phone_ensemble_fp16", command,
             shipped_as=f"its {len(seeds)} members' fp16 files in the phone app (app/public/model, written by "
                        "python -m melanoma_tf.export_app --members)")
    shutil.copyfile(first / "splits.csv", results / "splits.csv")

    rows = []
    for name, m in metrics.items():
        ext = (m.get("external") or {}).get(external, {})
        rows.append([name, report.with_ci(m, "roc_auc"), report.fmt(m.get("sensitivity")),
                     report.fmt(m.get("specificity")), report.fmt(m.get("ece_platt")),
                     report.with_ci(ext, "roc_auc") if ext else "n/a", report.fmt(ext.get("sensitivity")),
                     report.fmt(ext.get("specificity")), report.fmt(ext.get("ece_platt")),
                     report.fmt(m.get("size_mb"), "{:.2f}"), report.fmt(m.get("latency_ms_median"), "{:.2f}")])
    table = report.table(["model", "holdout ROC-AUC [95% CI]", "sens", "spec", "ECE (Platt)",
                          f"{external} ROC-AUC [95% CI]", "sens", "spec", "ECE (Platt)", "size MB", "latency ms"],
                         rows)
    gain_lines = [f"- {where}: distilled minus no-KD ROC-AUC per seed "
                  f"{', '.join(f'{g:+.3f}' for g in values)}; mean {np.mean(values):+.3f} "
                  f"(std {_mean_std(values)[1]:.3f})" for where, values in gains.items() if values]
    lines = [f"# Reference run: HAM10000 (shared subset) -> {external}, binary melanoma vs rest, ImageNet starts", "",
             f"Reproduce: `{command}` (2 CPU cores; wall time per step below).", "",
             "Every model is scored on the same lesion-grouped HAM10000 holdout (`splits.csv`) and on the external "
             f"set {external} (other clinics and devices; never trained, tuned or chosen on). The threshold is the "
             "one giving 95% sensitivity on the validation split, applied unchanged to both; ECE is after the "
             "validation-fitted Platt calibration stored in the sidecar. Intervals: bootstrap over lesions "
             "(over images on the external set, which has no lesion ids).", "", "## Models", "", table, "",
             ("Teachers' validation ROC-AUC: "
              + ", ".join(f"{label} {value:.3f}" for label, value in teacher_vals.items())
              + f"; the best no-KD student: {student_val:.3f}. The distillation teacher, the mean logit of the "
              "teachers and the no-KD students" if teacher_vals else
              f"No separate teacher was trained; the best no-KD student scores validation ROC-AUC {student_val:.3f}. "
              "The distillation teacher, the mean logit of the no-KD students")
             + (f" (4-flip TTA), scores validation ROC-AUC {distill_teacher_val:.3f} and"
                if distill_teacher_val is not None else ",")
             + f" holdout ROC-AUC {ensemble_auc:.3f} (for information; never chosen on the holdout)."
             + (f" On the same validation images without TTA it scores {margin['ensemble']:.3f} against "
                f"{margin['student']:.3f} for the best no-KD student ({margin['best_student']}): "
                f"{margin['difference']:+.3f}, paired 95% bootstrap interval over lesions "
                f"[{margin['ci'][0]:+.3f}, {margin['ci'][1]:+.3f}]." if margin else ""), "",
             "## Does distillation pay?", "", *gain_lines, "",
             "## The int8 model that ships", "",
             f"`student_int8.tflite` is the distilled student (seed {seeds[0]}) quantized by "
             f"{'quantization-aware training' if shipped == 'qat' else 'post-training int8 quantization'}: "
             "of QAT and post-training int8, the one with the higher validation ROC-AUC "
             f"({', '.join(f'{k} {v:.3f}' for k, v in val_auc.items()) or 'not measured'}).", "",
             "## Targets", "",
             "| target | value | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t} | {report.fmt(v)} | {g} | {'yes' if ok else 'NO'} |" for t, v, g, ok in checks]
    lines += ["", "## Wall time (seconds)", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += ["", "## Files", "",
              "- `student_int8.tflite` + `student_int8.json`: the int8 distilled student and its sidecar "
              "(input size and quantization, threshold, calibration). Score it on your data with "
              "`python -m melanoma_tf.evaluate --model results/reference_ham10000/student_int8.tflite "
              "--images DIR --labels CSV`; time it on a Pi with `tools/benchmark_tflite.py`.",
              "- `student_int8_eval.json`: its evaluation (holdout and external sets).",
              "- `student_fp16.tflite` + `student_fp16.json` + `student_fp16_eval.json`: the same student in fp16, "
              "the model of the phone app (`python -m melanoma_tf.export_app`).",
              "- `splits.csv`: the image-level split (train / val / holdout) of this run.",
              "- `roc.png`, `auc_vs_size.png`, `auc_vs_latency.png`: all models on the holdout; `student_int8_*.png`: "
              "the int8 student's ROC, PR, calibration and threshold plots.", ""]
    write_atomic(results / "report.md", "\n".join(lines))
    return summary


def _teacher_margin(members: list[Path], students: list[Path], n_boot: int) -> Optional[dict]:
    """The distillation teacher (mean logit of ``members``) against the best of ``students``, on validation.

    Uses each folder's ``eval_val/predictions.csv``; the best student is the one with the highest validation
    ROC-AUC there. The interval resamples lesions, scoring both on the same resample (paired); None when a
    member was not scored on validation.
    """
    import pandas as pd

    from melanoma_tf import metrics as M

    files = {folder: folder / "eval_val" / "predictions.csv" for folder in dict.fromkeys(members + students)}
    if not all(f.is_file() for f in files.values()):
        return None
    frames = {folder: pd.read_csv(f).set_index("image_id").sort_index() for folder, f in files.items()}
    first = frames[members[0]]
    for folder, frame in frames.items():
        if not frame.index.equals(first.index):
            raise ValueError(f"{files[folder]}: not the validation images of {files[members[0]]}")
    y = first["label"].to_numpy()
    ensemble = np.mean([frames[m]["logit"].to_numpy() for m in members], axis=0)
    scores = {s: M.roc_auc(y, frames[s]["logit"].to_numpy()) for s in students}
    best = max(scores, key=scores.get)
    student = frames[best]["logit"].to_numpy()
    pairs = np.stack([ensemble, student], axis=1)  # one row per image, resampled together

    def difference(labels, rows):
        rows = rows.astype(int)
        return M.roc_auc(labels, pairs[rows, 0]) - M.roc_auc(labels, pairs[rows, 1])

    ci = M.bootstrap_ci(y, np.arange(len(y)), first["lesion_id"].to_numpy(), difference, n_boot=n_boot)
    return {"ensemble": float(M.roc_auc(y, ensemble)), "student": float(scores[best]), "best_student": best.name,
            "difference": float(M.roc_auc(y, ensemble) - scores[best]), "ci": [ci[0], ci[1]],
            "n_images": int(len(y)), "n_melanoma": int(y.sum())}


def _teacher_label(name: str) -> str:
    """The report's name of a teacher step: ``teacher``, ``teacher efficientnet_lite0``, ..."""
    return name if name == "teacher" else "teacher " + name.removeprefix("teacher_")


def _ensemble_auc(folders: list[Path]) -> float:
    """Holdout ROC-AUC of the mean logit of several evaluated models (aligned by image id)."""
    import pandas as pd

    from melanoma_tf import metrics as M

    frames = [pd.read_csv(f / "predictions.csv").set_index("image_id") for f in folders]
    logits = np.mean([f["logit"] for f in frames], axis=0)
    return float(M.roc_auc(frames[0]["label"].to_numpy(), logits))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/reference_ham10000.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--results", help="summary folder (default results/<config name>)")
    parser.add_argument("--teachers", default="", metavar="NAME,...",
                        help="separate teachers, trained first and added to the ensemble: 'teacher' (the config's "
                             "teacher section) or config files next to the config, e.g. "
                             "teacher,teacher_efficientnet_lite0 (default: none; the ensemble of the no-KD "
                             "students teaches)")
    parser.add_argument("--teacher-size", type=int, default=224, help="the separate teachers' input size")
    parser.add_argument("--seeds", default="1,2,3", help="seeds of the no-KD students (also ensemble members)")
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--app-model", default=str(ROOT / "app" / "public" / "model"),
                        help="the phone app's model folder, given the phone ensemble's members at the end ('' "
                             "leaves it alone)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    config = Path(args.config)
    try:
        cfg = cfgmod.load(config, args.overrides)
    except cfgmod.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(cfg.output.dir)
    if not out.is_absolute():
        out = ROOT / out
    results = Path(args.results) if args.results else ROOT / "results" / config.stem
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    try:
        teachers = teacher_configs(args.teachers)
        steps = plan(config.resolve(), args.overrides, out, args.teacher_size, seeds, args.qat_epochs,
                     args.bootstrap, teachers)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        for step in steps:
            print(" ".join(step.argv))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    try:
        timings = run_steps(steps, out)
    except subprocess.CalledProcessError as err:
        print(f"error: step failed ({err.returncode}): {' '.join(err.cmd)}; run the same command again to "
              "continue", file=sys.stderr)
        return 1
    command = " ".join(["python tools/reference_run.py", "--config", args.config]
                       + (["--teachers", ",".join(teachers)] if teachers else [])
                       + [a for o in args.overrides for a in ("--set", o)])
    summary = assemble(out, results, seeds, timings, command, bootstrap=args.bootstrap, teachers=tuple(teachers))
    if args.app_model:
        install_app_model(out / PHONE_APP, Path(args.app_model))
        print(f"app model: {args.app_model}", flush=True)
    for target in summary["targets"]:
        print(f"target {target['target']}: {target['value']:.3f} (goal {target['goal']}) "
              f"{'OK' if target['met'] else 'MISSED'}")
    print(f"reference: {results}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
