"""Model soups: one model whose weights are the average of several fine-tuned runs (Wortsman et al. 2022).

    python -m melanoma_tf.soup --runs runs/a runs/b runs/c --out runs/soup [--coefficients 0.5,0.25,0.25]
        [--evaluate]

Students fine-tuned from the same pretrained start (seeds of one recipe, or recipes sharing
the start) usually sit in one basin of the loss, so the average of their weights is a model
of the same size and cost as each, which often generalises like their ensemble. Every
weight is averaged, BatchNorm's moving statistics included; the members must share the
architecture and the holdout (a member must not have trained on an image another one is
scored on). The soup folder is a run folder (``config.yaml``, ``splits.csv``,
``model.keras``), so ``evaluate``, ``quantize`` and ``export_app`` take it; ``soup.json``
names the members (folder names and checksums, no machine path). Its validation split is
the first member's: if the members' validation splits differ, the others trained on part
of it, so the threshold and calibration fitted there are optimistic, and ``soup.json``
says so.

    python -m melanoma_tf.soup --ensemble --runs runs/a runs/b runs/c --out runs/ensemble [--evaluate]

``--ensemble`` keeps every member whole instead: one model whose logit is the mean of the
members' logits (the prediction ensemble; members of any architecture with one input size).
It costs the members' size and time together, and it is the reference a soup is measured
against; on a phone, whose budget is 25 MB, it fits where one student is 2 MB.
"""

from __future__ import annotations

import argparse
from typing import Optional

from melanoma_tf.cli import run_main
from melanoma_tf.combine import make_ensemble, make_soup
from melanoma_tf.evaluation import evaluate
from melanoma_tf.runs import RunError


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="two or more trained runs of one architecture")
    parser.add_argument("--out", required=True, help="the soup's run folder")
    parser.add_argument("--coefficients", help="comma-separated weights, one per run (default: uniform)")
    parser.add_argument("--ensemble", action="store_true",
                        help="keep the members whole: one model whose logit is their mean (no weight averaging)")
    parser.add_argument("--evaluate", action="store_true", help="then score it on the holdout and external sets")
    args = parser.parse_args(argv)

    def go() -> str:
        coefficients = None
        if args.coefficients:
            try:
                coefficients = [float(x) for x in args.coefficients.split(",")]
            except ValueError:
                raise RunError(f"--coefficients {args.coefficients}: not a comma-separated list of numbers") from None
        if args.ensemble and coefficients is not None:
            raise RunError("--coefficients: an ensemble averages its members' logits uniformly")
        out = make_ensemble(args.runs, args.out) if args.ensemble else make_soup(args.runs, args.out, coefficients)
        kind = "ensemble" if args.ensemble else "soup"
        if args.evaluate:
            return f"{kind}: {out}; report: {evaluate(str(out))}"
        return f"{kind}: {out}"

    return run_main(go)


if __name__ == "__main__":
    raise SystemExit(main())
