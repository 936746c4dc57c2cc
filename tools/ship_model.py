"""Ships a quantized model of a run into results/: the flatbuffer, its sidecar and its evaluation.

    python tools/ship_model.py --run runs/student_mobilenetv3_tiny --mode int8 --name tiny_student_int8 \
        --results results/tiny_student --command "python -m melanoma_tf.train --config configs/student_mobilenetv3_tiny.yaml"

The run must have been quantized (``python -m melanoma_tf.quantize --run RUN --modes ...``), which also
evaluates each mode in ``RUN/tflite/eval_<mode>``; the run's ``splits.csv`` goes along. The copies name the file in the results folder and the run
by its folder name and the command that trained it: no path of this machine travels with them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from melanoma_tf.files import write_json  # noqa: E402


def shipped_evaluation(eval_dir: Path, model_name: str, run_name: str, model_file: Path) -> dict:
    """An evaluation of a shipped model, named by its file in results/ (no path of this machine)."""
    evaluation = json.loads((eval_dir / "metrics.json").read_text())
    # evaluate records which file it scored; an evaluation from before it did is of the file quantize wrote
    evaluation.setdefault("model_sha256", hashlib.sha256(model_file.read_bytes()).hexdigest())
    evaluation.update(model=model_name, model_file=model_name, run=run_name)
    return evaluation


def ship(run: Path, mode: str, eval_dir: Path, results: Path, name: str, command: str,
         shipped_as: str = "") -> Path:
    """Copies ``run``'s ``tflite/<mode>.tflite`` into ``results`` as ``<name>.tflite``, with its sidecar and its
    evaluation, both naming the file there and no path of this machine; returns the copied model.

    ``shipped_as``: the model ships in another form (an ensemble as its members' files, the phone app's): the
    flatbuffer is not copied, and the sidecar says where the model is instead."""
    source = run / "tflite" / f"{mode}.tflite"
    for needed in (source, source.with_suffix(".json"), eval_dir / "metrics.json"):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed}: not found (quantize the run first: python -m melanoma_tf.quantize "
                                    f"--run {run} --modes {mode})")
    results.mkdir(parents=True, exist_ok=True)
    if not shipped_as:
        shutil.copyfile(source, results / f"{name}.tflite")
    sidecar = json.loads(source.with_suffix(".json").read_text())
    sidecar.update(model=f"{name}.tflite", source_run=f"{run.name} of {command}")
    if shipped_as:
        sidecar["shipped_as"] = shipped_as
    write_json(results / f"{name}.json", sidecar)
    evaluation = shipped_evaluation(eval_dir, f"{name}.tflite", run.name, source)
    evaluation["model_name"] = f"{run.name}/{mode}"
    write_json(results / f"{name}_eval.json", evaluation)
    return results / f"{name}.tflite"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="the trained and quantized run folder")
    parser.add_argument("--mode", default="int8", help="which of RUN/tflite/<mode>.tflite (default int8)")
    parser.add_argument("--name", required=True, help="file stem in the results folder")
    parser.add_argument("--results", required=True, type=Path, help="the results folder")
    parser.add_argument("--command", required=True, help="the command that trained the run (recorded)")
    parser.add_argument("--shipped-as", default="", help="the model ships in another form (say which): its "
                                                         "sidecar and evaluation only, not the flatbuffer")
    args = parser.parse_args(argv)
    try:
        shipped = ship(args.run, args.mode, args.run / "tflite" / f"eval_{args.mode}", args.results, args.name,
                       args.command, args.shipped_as)
        if (args.run / "splits.csv").is_file():  # which images the evaluation's holdout is
            shutil.copyfile(args.run / "splits.csv", args.results / "splits.csv")
    except (FileNotFoundError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"shipped: {shipped if not args.shipped_as else shipped.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
