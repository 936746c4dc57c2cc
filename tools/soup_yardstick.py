"""Soups of a yardstick's seeds: per held-out split, the seeds alone, their logit ensemble and their weight soup.

    python tools/soup_yardstick.py runs/yardstick/student_pretrained_3ep \
        --out results/yardstick/student_pretrained_3ep/soups.md

For every split of a finished yardstick (``<yardstick>/<split>/seed<k>``), the seeds' models are averaged into
``<split>/soup`` (``python -m melanoma_tf.soup``) and scored on that split's holdout (the held-out clinic, or the
random holdout) and the external sets; the seeds' own predictions give their mean ROC-AUC and the ROC-AUC of
their mean logit (the ensemble, which costs one model per seed at inference; the soup costs one). Resumable: a
scored soup is not made again. Writes the table as Markdown and, beside it, JSON.
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

from melanoma_tf import metrics as M  # noqa: E402
from melanoma_tf.evaluation import evaluate  # noqa: E402
from melanoma_tf.files import write_atomic, write_json  # noqa: E402
from melanoma_tf.runs import RunError  # noqa: E402
from melanoma_tf.combine import make_soup  # noqa: E402


def _predictions(eval_dir: Path, external: Optional[str]) -> pd.DataFrame:
    folder = eval_dir if external is None else eval_dir / "external" / external
    return pd.read_csv(folder / "predictions.csv").set_index("image_id")


def score_split(split_dir: Path, n_boot: int) -> Optional[dict]:
    """The row of one split; None if it has fewer than two finished seeds."""
    seeds = sorted(d for d in split_dir.glob("seed*") if (d / "eval_holdout" / "metrics.json").is_file())
    if len(seeds) < 2:
        return None
    soup = split_dir / "soup"
    if not (soup / "eval_holdout" / "metrics.json").is_file():
        make_soup(seeds, soup)
        evaluate(str(soup), n_boot=n_boot, gradcam=0, latency_runs=5)
    soup_metrics = json.loads((soup / "eval_holdout" / "metrics.json").read_text())
    row = {"split": split_dir.name, "seeds": [d.name for d in seeds]}
    externals = sorted((soup_metrics.get("external") or {}).keys())
    for target in [None, *externals]:
        frames = [_predictions(d / "eval_holdout", target) for d in seeds]
        ids = frames[0].index
        labels = frames[0].loc[ids, "label"].to_numpy()
        alone = [M.roc_auc(labels, f.loc[ids, "logit"].to_numpy()) for f in frames]
        ensemble = M.roc_auc(labels, np.mean([f.loc[ids, "logit"].to_numpy() for f in frames], axis=0))
        scored = soup_metrics if target is None else soup_metrics["external"][target]
        row[target or "holdout"] = {"seeds_mean": float(np.mean(alone)), "seeds_sd": float(np.std(alone, ddof=1)),
                                    "ensemble": float(ensemble), "soup": float(scored["roc_auc"]),
                                    "soup_ci": scored.get("roc_auc_ci"), "n_images": int(len(ids))}
    return row


def table(rows: list[dict]) -> str:
    targets = ["holdout"] + sorted({k for r in rows for k in r if k not in ("split", "seeds", "holdout")})
    lines = ["| held out | scored on | seeds alone: mean (sd) | ensemble of the seeds | soup of the seeds [95% CI] |",
             "|---|---|---|---|---|"]
    for row in rows:
        for target in targets:
            if target not in row:
                continue
            cell = row[target]
            ci = cell["soup_ci"]
            interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
            where = "its holdout" if target == "holdout" else target
            lines.append(f"| {row['split']} | {where} ({cell['n_images']}) | {cell['seeds_mean']:.3f} "
                         f"({cell['seeds_sd']:.3f}) | {cell['ensemble']:.3f} | {cell['soup']:.3f}{interval} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("yardstick", type=Path, help="a yardstick's --out folder")
    parser.add_argument("--out", type=Path, help="the Markdown table (default: <yardstick>/soups.md)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates of the soup's interval")
    args = parser.parse_args(argv)
    splits = sorted(d for d in args.yardstick.iterdir() if d.is_dir()) if args.yardstick.is_dir() else []
    rows, skipped = [], {}
    for split in splits:
        try:
            row = score_split(split, args.bootstrap)
        except RunError as err:  # e.g. the random split: every seed draws its own holdout, so no soup
            skipped[split.name] = str(err).replace(str(args.yardstick.parent) + "/", "")
            print(f"{split.name}: no soup: {skipped[split.name]}", file=sys.stderr)
            continue
        if row:
            rows.append(row)
    if not rows:
        print(f"error: {args.yardstick}: no split with two or more finished seeds", file=sys.stderr)
        return 2
    out = args.out or args.yardstick / "soups.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    notes = "".join(f"\n{name}: no soup ({reason})\n" for name, reason in skipped.items())
    write_atomic(out, (table(rows) + notes).encode())
    write_json(out.with_suffix(".json"), {"yardstick": args.yardstick.name, "rows": rows, "skipped": skipped})
    print(f"soups: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
