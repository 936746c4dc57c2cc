"""Write the synthetic dermoscopy-like dataset (HAM10000 layout) to a folder.

    python tools/make_synthetic.py OUT_DIR [--lesions 400] [--melanoma-fraction 0.25] [--size 96] [--seed 0]

The folder can then be used as ``data.root`` like a real HAM10000 download.
"""

import argparse
import sys

from melanoma_tf import synthetic


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--lesions", type=int, default=400)
    parser.add_argument("--melanoma-fraction", type=float, default=0.25)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--second-image-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.lesions < 1 or not 0 < args.melanoma_fraction < 1 or args.size < 16:
        print("error: need --lesions >= 1, 0 < --melanoma-fraction < 1 and --size >= 16", file=sys.stderr)
        return 2
    root = synthetic.generate(args.out_dir, args.lesions, args.melanoma_fraction, args.size,
                              args.second_image_fraction, args.seed)
    print(f"data.root: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
