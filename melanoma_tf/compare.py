"""Compare evaluated models in one table and one ROC plot.

    python -m melanoma_tf.compare RUN_OR_EVAL_DIR... [--out DIR] [--split holdout]

Reads each evaluation's ``metrics.json`` and ``predictions.csv`` (given an evaluation
folder, or a run folder holding ``eval_<split>*`` folders) and writes ``compare.md``,
``compare.csv``, one ROC plot and ROC-AUC against size and against latency
(:func:`melanoma_tf.report.compare`). The last line printed is ``report: <compare.md>``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from melanoma_tf import report
from melanoma_tf.cli import run_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m melanoma_tf.compare", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="run folders or evaluation folders")
    parser.add_argument("--out", help="output folder (default runs/compare)")
    parser.add_argument("--split", default="holdout", help="which evaluations to pick from run folders")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> str:
        path = report.compare(args.paths, args.out, args.split)
        print(Path(path).read_text())
        return f"report: {path}"

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())
