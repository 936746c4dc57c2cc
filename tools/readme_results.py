#!/usr/bin/env python3
"""The README's headline table, made from the committed reference run (never typed by hand).

    python tools/readme_results.py            # rewrite the table between the markers in README.md
    python tools/readme_results.py --check    # exit 1 if README.md's table is not what results/ says

Reads ``results/reference_ham10000/metrics.json`` (written by ``tools/reference_run.py``) and
writes the rows a newcomer needs: the shipped int8 student, the phone app's model (the students'
fp16 ensemble), the fp16 student, the microcontroller-class tiny student and the best baseline, on
the HAM10000 holdout and ISIC 2017. The tiny student's and the phone ensemble's rows are the
evaluations of what is committed (``tiny_student_int8_eval.json``, ``phone_ensemble_fp16_eval.json``
beside the metrics) when there are.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "reference_ham10000" / "metrics.json"
TINY_EVAL = RESULTS.parent / "tiny_student_int8_eval.json"
PHONE_EVAL = RESULTS.parent / "phone_ensemble_fp16_eval.json"
START, END = "<!-- headline table: tools/readme_results.py -->", "<!-- end of headline table -->"
EXTERNAL = "isic2017"


def _auc(m: dict) -> str:
    low, high = m["roc_auc_ci"]
    return f"{m['roc_auc']:.3f} [{low:.3f}, {high:.3f}]"


def headline_table(metrics: dict, tiny: Optional[dict] = None, phone: Optional[dict] = None) -> str:
    """Markdown rows: what ships (int8, QAT or post-training as the run chose), the app's fp16, the tiny student,
    and the baseline with the best holdout ROC-AUC.

    ``tiny``: the evaluation of the committed tiny student (``tiny_student_int8_eval.json``); without it the row
    is the run's own tiny student, whose file was not committed. ``phone``: the evaluation of the phone app's
    ensemble (``phone_ensemble_fp16_eval.json``); without it the fp16 student is the app's.
    """
    models = metrics["models"]
    shipped = f"distilled student {metrics['shipped_int8']['mode'].upper().replace('INT8', 'PTQ')} int8 (TFLite)"
    if shipped not in models:
        shipped = next(name for name in models if name.startswith("distilled student") and "int8" in name)
    baselines = [name for name in models if name.startswith("baseline")]
    best = max(baselines, key=lambda name: models[name]["roc_auc"])
    tiny_row = (("tiny int8 student, distilled (512 KB-class boards)", tiny) if tiny is not None else
                ("tiny int8 student, distilled (512 KB-class boards; file not committed)",
                 models[next(n for n in models if n.startswith("tiny student"))]))
    fp16 = models["distilled student fp16 (TFLite)"]
    phone_rows = ([("fp16 ensemble of the no-KD students (the phone app's)", phone), ("fp16 student", fp16)]
                  if phone is not None else [("fp16 student (the phone app's)", fp16)])
    rows = [("**shipped int8 student** (microcontroller, Pi)", models[shipped]), *phone_rows, tiny_row,
            (f"best baseline ({best.removeprefix('baseline ')}, colour/texture features)", models[best])]
    lines = ["| model | HAM10000 holdout ROC-AUC [95% CI] | sens / spec | ISIC 2017 ROC-AUC [95% CI] | "
             "ISIC sens / spec | ISIC ECE | size MB |", "|---|---|---|---|---|---|---|"]
    for label, m in rows:
        ext = m["external"][EXTERNAL]
        lines.append(f"| {label} | {_auc(m)} | {m['sensitivity']:.3f} / {m['specificity']:.3f} | {_auc(ext)} | "
                     f"{ext['sensitivity']:.3f} / {ext['specificity']:.3f} | {ext['ece_platt']:.3f} | "
                     f"{m['size_mb']:.2f} |")
    return "\n".join(lines)


def with_table(readme: str, table: str) -> str:
    """``readme`` with the text between the markers replaced by ``table``."""
    if START not in readme or END not in readme:
        raise SystemExit(f"error: README.md has no '{START}' ... '{END}' markers")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check README.md")
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    args = parser.parse_args(argv)
    readme = Path(args.readme)
    current = readme.read_text()
    tiny = json.loads(TINY_EVAL.read_text()) if TINY_EVAL.is_file() else None
    phone = json.loads(PHONE_EVAL.read_text()) if PHONE_EVAL.is_file() else None
    wanted = with_table(current, headline_table(json.loads(RESULTS.read_text()), tiny, phone))
    if args.check:
        if wanted != current:
            print(f"error: {readme}'s headline table differs from {RESULTS.relative_to(ROOT)}: "
                  "run python tools/readme_results.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(wanted)
    print(f"wrote the headline table into {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
