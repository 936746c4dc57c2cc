"""What the app must show for some shared HAM10000 images, computed by the Python side.

Run by tests/app.test.mjs (so the expected values are never typed by hand): the shipped int8
model is run by the Python LiteRT interpreter on the images preprocessed as in training
(melanoma_tf.evaluate.load_images), and the sidecar's calibration and decision rule are applied
(melanoma_tf.export_app). Writes JSON: [{path, logit, probability, decision}, ...].

    python app/tests/expected_outputs.py --n 20 --out expected.json
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from melanoma_tf.pipeline import load_images
from melanoma_tf.export_app import decision, shown_probability
from melanoma_tf.tflite import TFLiteModel, verify_model_file

REPO = Path(__file__).resolve().parents[2]


def pick_images(root: Path, n: int) -> list[Path]:
    """n/2 melanomas and n/2 other lesions, the first by image id among the files present."""
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    present = {p.stem: p for p in (root / "images").glob("*.jpg")}
    meta = meta[meta["image_id"].isin(present)].sort_values("image_id")
    mel = meta[meta["dx"] == "mel"]["image_id"].head(n // 2)
    other = meta[meta["dx"] != "mel"]["image_id"].head(n - len(mel))
    return [present[i] for i in [*mel, *other]]


def browser_decoded(paths: list[Path], size: int) -> np.ndarray:
    """The images as the app sees them: decoded like a browser, centre square, resized as in training."""
    import tensorflow as tf
    from PIL import Image

    out = []
    for path in paths:
        rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        h, w = rgb.shape[:2]
        side = min(h, w)
        y, x = (h - side) // 2, (w - side) // 2
        square = rgb[y:y + side, x:x + side]
        out.append(tf.image.resize(square, (size, size), method="bilinear", antialias=True).numpy())
    return np.stack(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO / "results/reference_ham10000/student_fp16.tflite"))
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/ham10000"))
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--out", required=True, help="JSON file to write (stdout carries runtime logs)")
    args = parser.parse_args()
    sidecar = verify_model_file(args.model)
    model = TFLiteModel(args.model)
    paths = pick_images(Path(args.data), args.n)
    size = int(model.input_shape[1])
    logits = model.predict(browser_decoded(paths, size))[:, 0]
    tf_logits = model.predict(load_images([str(p) for p in paths], size))[:, 0]
    rows = [{"path": str(p), "logit": float(z), "probability": shown_probability(float(z), sidecar),
             "decision": decision(float(z), sidecar), "logit_tf_decode": float(t),
             "probability_tf_decode": shown_probability(float(t), sidecar)}
            for p, z, t in zip(paths, np.asarray(logits), np.asarray(tf_logits))]
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
