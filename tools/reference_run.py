"""The reference run: teacher, no-KD students, distilled student, QAT int8, baselines, one holdout.

    python tools/reference_run.py --config configs/reference_ham10000.yaml [--set key=value ...]

Every step is an ordinary command of the package run in its own process, in a
fixed folder under ``output.dir`` of the config, so the run is resumable: run
the same command again after a crash and finished steps are skipped, a killed
training continues from its last epoch. At the end the summary is assembled in
``--results`` (default ``results/<config name>``): ``report.md``,
``metrics.json``, the comparison plots, ``student_int8.tflite`` with its
``student_int8.json`` sidecar, and the run's ``splits.csv``. The last line
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

# The quality targets of the reference run (issue 6), checked in the report.
TARGET_ROC_AUC = 0.92
TARGET_SPECIFICITY = 0.70
TARGET_MARGIN_OVER_BASELINE = 0.05


@dataclass
class Step:
    name: str
    argv: list[str]
    done: Path  # exists once the step has finished


def plan(config: Path, overrides: list[str], out: Path, teacher_size: int, seeds: list[int],
         qat_epochs: int, bootstrap: int) -> list[Step]:
    """The commands of the reference run, in order."""
    py = [sys.executable, "-m"]
    base = ["--config", str(config)] + [a for o in overrides for a in ("--set", o)]
    train = py + ["melanoma_tf.train"] + base + ["--set", "output.evaluate=true"]
    steps = [Step("teacher", train + ["--set", "stages=[teacher]", "--set", f"data.image_size={teacher_size}",
                                      "--run-dir", str(out / "teacher")],
                  out / "teacher" / "eval_holdout" / "metrics.json")]
    for seed in seeds:
        folder = out / f"student_seed{seed}"
        steps.append(Step(f"student_seed{seed}", train + ["--set", "stages=[student]", "--set", f"seed={seed}",
                                                          "--run-dir", str(folder)],
                          folder / "eval_holdout" / "metrics.json"))
    members = [str(out / "teacher")] + [str(out / f"student_seed{s}") for s in seeds]
    steps.append(Step("distill", train + ["--set", "stages=[distill]", "--set", f"distill.teacher=[{', '.join(members)}]",
                                          "--run-dir", str(out / "distill")],
                      out / "distill" / "eval_holdout" / "metrics.json"))
    steps.append(Step("quantize", py + ["melanoma_tf.quantize", "--run", str(out / "distill"), "--modes",
                                        "fp32,fp16,int8,qat", "--qat-epochs", str(qat_epochs),
                                        "--bootstrap", str(bootstrap)],
                      out / "distill" / "tflite" / "qat.json"))
    steps.append(Step("baselines", py + ["melanoma_tf.baselines"] + base +
                      ["--set", f"output.dir={out}", "--set", "output.name=baselines", "--run", str(out / "distill"),
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
    return timings


def _newest(folder: Path, pattern: str) -> Path:
    found = sorted(p for p in folder.glob(pattern) if p.is_dir())
    if not found:
        raise FileNotFoundError(f"{folder}: nothing matches {pattern}")
    return found[-1]


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def assemble(out: Path, results: Path, seeds: list[int], timings: dict, command: str) -> dict:
    """Writes the results folder from the finished run; returns the summary."""
    from melanoma_tf import report

    baselines = out / (out / "baselines.done").read_text().strip()
    evaluations = {"teacher ResNet50": out / "teacher" / "eval_holdout"}
    evaluations.update({f"student no-KD seed {s}": out / f"student_seed{s}" / "eval_holdout" for s in seeds})
    evaluations["distilled student (fp32 Keras)"] = out / "distill" / "eval_holdout"
    evaluations["distilled student QAT int8 (TFLite)"] = out / "distill" / "tflite" / "eval_qat"
    evaluations["distilled student PTQ int8 (TFLite)"] = out / "distill" / "tflite" / "eval_int8"
    for name in ("logreg", "hgb", "rf"):
        if (baselines / name / "eval_holdout" / "metrics.json").is_file():
            evaluations[f"baseline {name}"] = baselines / name / "eval_holdout"
    metrics = {name: _metrics(folder) for name, folder in evaluations.items()}

    results.mkdir(parents=True, exist_ok=True)
    compare_dir = out / "compare"
    report.compare([str(f) for f in evaluations.values()], str(compare_dir))
    qat = metrics["distilled student QAT int8 (TFLite)"]
    no_kd = [metrics[f"student no-KD seed {s}"]["roc_auc"] for s in seeds]
    best_baseline = max((m["roc_auc"], n) for n, m in metrics.items() if n.startswith("baseline"))
    checks = [
        ("QAT int8 holdout ROC-AUC", qat["roc_auc"], f">= {TARGET_ROC_AUC}", qat["roc_auc"] >= TARGET_ROC_AUC),
        ("QAT int8 specificity at the validation-chosen 95%-sensitivity threshold", qat["specificity"],
         f">= {TARGET_SPECIFICITY}", qat["specificity"] >= TARGET_SPECIFICITY),
        (f"QAT int8 ROC-AUC minus the best baseline ({best_baseline[1]}, {best_baseline[0]:.3f})",
         qat["roc_auc"] - best_baseline[0], f">= {TARGET_MARGIN_OVER_BASELINE}",
         qat["roc_auc"] - best_baseline[0] >= TARGET_MARGIN_OVER_BASELINE),
        (f"QAT int8 ROC-AUC minus the no-KD student (mean of {len(seeds)} seeds, {np.mean(no_kd):.3f})",
         qat["roc_auc"] - float(np.mean(no_kd)), "> 0", qat["roc_auc"] > float(np.mean(no_kd))),
    ]
    ensemble_auc = _ensemble_auc([evaluations["teacher ResNet50"]] +
                                 [evaluations[f"student no-KD seed {s}"] for s in seeds])
    summary = {
        "command": command,
        "teacher_ensemble_holdout_roc_auc": ensemble_auc,
        "models": {name: {k: m.get(k) for k in ("roc_auc", "roc_auc_ci", "pr_auc", "threshold", "sensitivity",
                                                 "specificity", "ppv", "npv", "f1", "ece", "brier", "params",
                                                 "size_mb", "latency_ms_median", "n_images")}
                   for name, m in metrics.items()},
        "no_kd_roc_auc_mean": float(np.mean(no_kd)), "no_kd_roc_auc_std": float(np.std(no_kd, ddof=1))
        if len(no_kd) > 1 else 0.0,
        "targets": [{"target": t, "value": float(v), "goal": g, "met": bool(ok)} for t, v, g, ok in checks],
        "seconds": timings,
    }
    write_json(results / "metrics.json", summary)
    for name in ("roc.png", "auc_vs_size.png", "auc_vs_latency.png"):
        if (compare_dir / name).is_file():
            shutil.copyfile(compare_dir / name, results / name)
    qat_eval = out / "distill" / "tflite" / "eval_qat"
    for png in sorted(qat_eval.glob("*.png")):
        shutil.copyfile(png, results / f"student_int8_{png.name}")
    shutil.copyfile(out / "distill" / "tflite" / "qat.tflite", results / "student_int8.tflite")
    sidecar = json.loads((out / "distill" / "tflite" / "qat.json").read_text())
    sidecar["model"] = "student_int8.tflite"
    write_json(results / "student_int8.json", sidecar)
    shutil.copyfile(out / "distill" / "splits.csv", results / "splits.csv")

    compare_table = report.table(["model"] + [h for _, h, _ in report.SUMMARY_COLUMNS],
                                 [[name] + report.summary_row(m) for name, m in metrics.items()])
    lines = ["# Reference run: HAM10000 (shared subset), binary melanoma vs rest, from scratch", "",
             f"Reproduce: `{command}` (2 CPU cores; wall time per step below).", "",
             "Every model is scored on the same lesion-grouped holdout (`splits.csv`); the threshold is the one "
             "giving 95% sensitivity on the validation split, then applied to the holdout. Confidence intervals: "
             "bootstrap over lesions.", "", "## Models", "", compare_table, "",
             f"No-KD students: holdout ROC-AUC {', '.join(f'{a:.3f}' for a in no_kd)} "
             f"(mean {np.mean(no_kd):.3f}). The distillation teacher, the mean logit of the ResNet50 and the three "
             f"students, scores holdout ROC-AUC {ensemble_auc:.3f} (for information; it was never chosen on the "
             "holdout).", "", "## Targets", "",
             "| target | value | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t} | {v:.3f} | {g} | {'yes' if ok else 'NO'} |" for t, v, g, ok in checks]
    lines += ["", "## Wall time (seconds)", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += ["", "## Files", "",
              "- `student_int8.tflite` + `student_int8.json`: the QAT int8 distilled student and its sidecar "
              "(input size and quantization, threshold). Score it on your data with "
              "`python -m melanoma_tf.evaluate --model results/reference_ham10000/student_int8.tflite "
              "--images DIR --labels CSV`; time it on a Pi with `tools/benchmark_tflite.py`.",
              "- `splits.csv`: the image-level split (train / val / holdout) of this run.",
              "- `roc.png`, `auc_vs_size.png`, `auc_vs_latency.png`: all models; `student_int8_*.png`: the int8 "
              "student's ROC, PR, calibration and threshold plots.", ""]
    write_atomic(results / "report.md", "\n".join(lines))
    return summary


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
    parser.add_argument("--teacher-size", type=int, default=96, help="the ResNet50 teacher's input size")
    parser.add_argument("--seeds", default="1,2,3", help="seeds of the no-KD students (also ensemble members)")
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--bootstrap", type=int, default=1000)
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
    steps = plan(config.resolve(), args.overrides, out, args.teacher_size, seeds, args.qat_epochs, args.bootstrap)
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
                       + [a for o in args.overrides for a in ("--set", o)])
    summary = assemble(out, results, seeds, timings, command)
    for target in summary["targets"]:
        print(f"target {target['target']}: {target['value']:.3f} (goal {target['goal']}) "
              f"{'OK' if target['met'] else 'MISSED'}")
    print(f"reference: {results}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
