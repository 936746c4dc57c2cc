"""The phone's model against the shipped int8 student, on the multi-clinic yardstick.

    python tools/phone_yardstick.py runs/yardstick/student_pretrained_3ep \
        [--out results/yardstick/student_pretrained_3ep/phone.md] [--bootstrap 1000]

The issue's phone target is a model at least 0.03 above the shipped int8 student on the
leave-one-clinic-out mean. The shipped models are one training split's; this measures the same
two kinds of model on a finished yardstick instead (``<yardstick>/<clinic>/seed<k>``, each run
trained without its clinic): every run is converted by ``python -m melanoma_tf.quantize`` to
post-training int8 (what the microcontroller and the Pi run) and fp16 (what the phone runs), each
flatbuffer scored on the run's held-out clinic and ISIC 2017. The phone's model is the seeds'
fp16 ensemble (their mean logit, as the app computes it from its members).

Per model: each clinic's ROC-AUC (a single model: the mean over seeds), the leave-one-clinic-out
mean with a 95% interval (lesions resampled within each clinic), the paired difference from the
int8 student with its interval, and ISIC 2017 (reported, never chosen on). Resumable: a run whose
conversions are scored is not converted again. Writes the table as Markdown and, beside it, CSV.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import kd_grid as G  # noqa: E402
from melanoma_tf import metrics as M  # noqa: E402
from melanoma_tf import yardstick as Y  # noqa: E402
from melanoma_tf.cli import run_main  # noqa: E402
from melanoma_tf.errors import MelanomaTfError  # noqa: E402
from melanoma_tf.files import write_atomic  # noqa: E402
from melanoma_tf.runs import RunError  # noqa: E402

EXTERNAL = "isic2017"
MODES = ("int8", "fp16")
# (row, mode of each seed's file, combined: the seeds' mean logit as one model, or each seed alone)
MODELS = (("int8 student (post-training; the shipped kind)", "int8", False),
          ("fp16 student", "fp16", False),
          ("fp32 student (Keras)", "keras", False),
          ("fp16 ensemble of the seeds (the phone app's kind)", "fp16", True),
          ("fp32 ensemble of the seeds", "keras", True))


class PhoneYardstickError(MelanomaTfError, ValueError):
    """The yardstick folder cannot be used; the message names the folder or run."""


def _runs(yardstick: Path) -> tuple[list[str], dict[str, list[Path]]]:
    plan_file = yardstick / "plan.json"
    if not plan_file.is_file():
        raise PhoneYardstickError(f"{yardstick}: no plan.json (not a python -m melanoma_tf.yardstick --out folder)")
    plan = json.loads(plan_file.read_text())
    clinics = list(plan.get("clinics") or [])
    runs = {}
    for clinic in clinics:
        found = [Y.run_folder(yardstick, clinic, s) for s in plan.get("seeds", [])]
        for run in found:
            try:
                G._stage_dir(run)
            except RunError as err:
                raise PhoneYardstickError(f"{err}: the yardstick has not finished this run, or its models were "
                                          "not kept") from None
        runs[clinic] = found
    if not clinics or min(len(r) for r in runs.values()) < 2:
        raise PhoneYardstickError(f"{plan_file}: needs clinics with two or more seeds each (an ensemble of seeds)")
    return clinics, runs


def quantize_runs(runs: dict[str, list[Path]]) -> None:
    """Converts and scores every run not yet scored in each mode (``python -m melanoma_tf.quantize``)."""
    for folders in runs.values():
        for run in folders:
            G.convert_run(run, MODES)


def _frames(runs: list[Path], mode: str, external: Optional[str]) -> list[pd.DataFrame]:
    """Each run's predictions (index image_id; label, lesion_id, probability, logit) of ``mode`` on a set."""
    frames = []
    for run in runs:
        path = G.quant_eval_dir(run, mode) / (f"external/{external}" if external else "") / "predictions.csv"
        try:
            frame = pd.read_csv(path, dtype={"image_id": str, "lesion_id": str})
            frames.append(frame.set_index("image_id")[["label", "lesion_id", "probability", "logit"]])
        except (KeyError, ValueError, pd.errors.ParserError) as err:  # EmptyDataError is a ValueError
            raise PhoneYardstickError(f"{path}: not the predictions of melanoma_tf.evaluate ({err}); delete the "
                                      f"folder {path.parent.name} to score the run again") from None
    return frames


def _ensemble(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """One frame of the seeds' mean logit (as a probability: the ranking, and so the ROC-AUC, is the logit's)."""
    ids = frames[0].index
    mean = np.mean([f.loc[ids, "logit"].to_numpy() for f in frames], axis=0)
    return frames[0].loc[ids, ["label", "lesion_id"]].assign(probability=1 / (1 + np.exp(-mean)), logit=mean)


def score(clinics: list[str], runs: dict[str, list[Path]], n_boot: int = 1000) -> pd.DataFrame:
    """One row per model of ``MODELS``: per clinic, LOCO mean [interval], vs the int8 student, ISIC 2017."""

    def groups(mode: str, combined: bool, external: Optional[str]) -> list[list[pd.DataFrame]]:
        per_clinic = [_frames(runs[c], mode, external) for c in clinics]
        if combined:
            per_clinic = [[_ensemble(frames)] for frames in per_clinic]
        return per_clinic if external is None else [[f for frames in per_clinic for f in frames]]

    base = {None: groups("int8", False, None), EXTERNAL: groups("int8", False, EXTERNAL)}
    rows = []
    for name, mode, combined in MODELS:
        row: dict = {"model": name, "mode": mode, "ensemble": combined}
        held_out = groups(mode, combined, None)
        for clinic, frames in zip(clinics, held_out):
            row[clinic] = float(np.mean([M.roc_auc(f["label"].to_numpy(), f["logit"].to_numpy()) for f in frames]))
        for key, target, group in (("loco", None, held_out), (EXTERNAL, EXTERNAL, None)):
            group = group if group is not None else groups(mode, combined, target)
            value = G.mean_auc_interval(group, n_boot)
            row.update({f"{key}_mean": value["mean"], f"{key}_low": value["low"], f"{key}_high": value["high"]})
            if not (mode == "int8" and not combined):
                # an ensemble (one frame per clinic) minus the seeds' mean ROC-AUC, resampled together
                paired = G.mean_auc_interval(group, n_boot, against=base[target])
                row.update({f"{key}_vs_int8": paired["mean"], f"{key}_vs_int8_low": paired["low"],
                            f"{key}_vs_int8_high": paired["high"]})
        files = [G.quant_eval_dir(run, mode).parent / f"{mode}.tflite" for c in clinics for run in runs[c]]
        sizes = [f.stat().st_size for f in files if f.is_file()]
        row["size_mb"] = (float(np.mean(sizes)) * (len(runs[clinics[0]]) if combined else 1) / 1e6
                          if sizes else np.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def table(frame: pd.DataFrame, clinics: list[str], yardstick: str) -> str:
    lines = [f"# The phone's model against the int8 student on the yardstick ({yardstick})", "",
             "Each clinic held out in turn, every seed's run converted by `python -m melanoma_tf.quantize`; a single "
             "model's score is the mean over seeds, an ensemble is the seeds' mean logit. LOCO: mean over clinics "
             "with a 95% interval (lesions resampled); vs int8: paired difference from the int8 student on the same "
             f"images; {EXTERNAL}: reported, never chosen on. Size: the flatbuffer(s) one device holds "
             "(Keras rows: the fp32 weights' TFLite size is not measured here).", "",
             "| model | " + " | ".join(clinics) + " | LOCO mean [95% CI] | vs int8 [95% CI] | "
             f"{EXTERNAL} [95% CI] | vs int8 ({EXTERNAL}) | size MB |",
             "|---|" + "---|" * len(clinics) + "---|---|---|---|---|"]
    for row in frame.to_dict("records"):
        size = f"{row['size_mb']:.2f}" if np.isfinite(row["size_mb"]) else ""
        lines.append(f"| {row['model']} | " + " | ".join(f"{row[c]:.3f}" for c in clinics)
                     + f" | {G._cell(row, 'loco_mean')} | {G._paired(row, 'loco_vs_int8')} | "
                     f"{G._cell(row, f'{EXTERNAL}_mean')} | {G._paired(row, f'{EXTERNAL}_vs_int8')} | {size} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/phone_yardstick.py", description=__doc__.split("\n")[0])
    parser.add_argument("yardstick", type=Path, help="a finished yardstick's --out folder (models kept)")
    parser.add_argument("--out", type=Path, help="the Markdown table (default: <yardstick>/phone.md)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates of each interval")
    args = parser.parse_args(argv)

    def work() -> str:
        clinics, runs = _runs(args.yardstick)
        quantize_runs(runs)
        frame = score(clinics, runs, args.bootstrap)
        out = args.out or args.yardstick / "phone.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, table(frame, clinics, args.yardstick.name))
        write_atomic(out.with_suffix(".csv"), frame.to_csv(index=False))
        return f"phone vs int8: {out}"

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())
