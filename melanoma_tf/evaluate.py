"""Score a model on a split and write the clinical report.

    python -m melanoma_tf.evaluate --run RUN_DIR [--model FILE] [--split val|holdout]
        [--images DIR --labels CSV] [--out DIR]
    python -m melanoma_tf.evaluate --run RUN_DIR RUN_DIR ...   (each run's own report, one process)

The operating point is the threshold reaching the target sensitivity (0.95 by
default) on the run's *validation* split, applied unchanged to the split being
reported; temperature scaling and the referral band are fitted on validation
too. A ``.tflite`` with a sidecar JSON can be scored without ``--run`` on
external images, taking its preprocessing and threshold from the sidecar.
Writes ``predictions.csv``, ``metrics.json``, PNG plots and ``report.md``; the
last line printed is ``report: <path of report.md>``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from melanoma_tf.backend import tf
from melanoma_tf.cli import run_main
from melanoma_tf.evaluation import EvaluationError, evaluate

log = logging.getLogger("melanoma_tf.evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m melanoma_tf.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--run", nargs="+", metavar="RUN_DIR",
                        help="run folder (a chained run: its last stage); several are scored one after another")
    parser.add_argument("--model", help=".keras or .tflite file (default: the run's model.keras)")
    parser.add_argument("--split", choices=("val", "holdout"), default="holdout")
    parser.add_argument("--images", help="external image folder (with --labels)")
    parser.add_argument("--labels", help="external labels CSV: image_id,label")
    parser.add_argument("--out", help="output folder (default: <run>/eval_<split>)")
    parser.add_argument("--target-sensitivity", type=float, default=0.95)
    parser.add_argument("--refer-fraction", type=float, default=0.1,
                        help="share of validation images in the referral band around the threshold")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (over lesions)")
    parser.add_argument("--gradcam", type=int, default=4, help="Grad-CAM images per kind (FN, FP); 0: none")
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow threads (latency is batch 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--on-corrupt", choices=("error", "skip"),
                        help="an --images file that does not decode: stop naming it, or leave it out and count it "
                             "(default: the run's data.on_corrupt, else error)")
    parser.add_argument("--no-external", action="store_true",
                        help="do not also score the run's external test sets (data.external)")
    return parser


def configure_threads(threads: int) -> None:
    """Pins TensorFlow's thread pools; must run before the first TensorFlow op."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        log.warning("TensorFlow already started; thread count unchanged")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> str:
        if not 0 < args.target_sensitivity <= 1:
            raise EvaluationError("--target-sensitivity must be in (0, 1]")
        run_dirs = args.run or [None]
        if len(run_dirs) > 1 and (args.model or args.out or args.images or args.labels):
            raise EvaluationError("--model, --out and --images/--labels go with a single --run "
                                  f"(got {len(run_dirs)} runs)")
        configure_threads(args.threads)

        def report(run_dir) -> str:
            return "report: " + str(evaluate(run_dir, args.model, args.split, args.images, args.labels, args.out,
                                             args.target_sensitivity, args.refer_fraction, args.bootstrap,
                                             args.gradcam, args.latency_runs, args.seed,
                                             external=not args.no_external, on_corrupt=args.on_corrupt))

        for run_dir in run_dirs[:-1]:
            print(report(run_dir), flush=True)
        return report(run_dirs[-1])  # run_main prints the last line

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())
