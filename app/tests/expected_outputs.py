"""What the app must show for some shared HAM10000 images, computed by the Python side.

Run by tests/app.test.mjs (so the expected values are never typed by hand): the app's model
files (app/public/model: one model, or an ensemble's members whose logits are averaged) are run
by the Python LiteRT interpreter on the images preprocessed as in training
(melanoma_tf.pipeline.load_images, after the centre square the app crops), and the sidecar's
calibration and decision rule are applied (melanoma_tf.export_app). That those files score what
app.json claims is tests/test_export_app.py's check. Writes JSON: [{path, logit, probability, decision}, ...].

    python app/tests/expected_outputs.py --n 20 --out expected.json
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from melanoma_tf.pipeline import load_images
from melanoma_tf.export_app import app_logits, decision, read_app_folder, shown_probability

REPO = Path(__file__).resolve().parents[2]


def pick_images(root: Path, n: int) -> list[Path]:
    """n/2 melanomas and n/2 other lesions, the first by image id among the files present."""
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    present = {p.stem: p for p in (root / "images").glob("*.jpg")}
    meta = meta[meta["image_id"].isin(present)].sort_values("image_id")
    mel = meta[meta["dx"] == "mel"]["image_id"].head(n // 2)
    other = meta[meta["dx"] != "mel"]["image_id"].head(n - len(mel))
    return [present[i] for i in [*mel, *other]]


def save_crops(paths: list[Path], folder: Path, box, name) -> list[Path]:
    """Each image cut to ``box(index, width, height)`` and saved losslessly (PNG) as ``folder / name(index, path)``."""
    from PIL import Image

    out = []
    for index, path in enumerate(paths):
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        crop = folder / name(index, path)
        rgb.crop(box(index, *rgb.size)).save(crop)
        out.append(crop)
    return out


def centre_squares(paths: list[Path], folder: Path) -> list[Path]:
    """The centre square the app crops (its guide), so the training reader can read what the app sees."""
    def box(index, w, h):
        side = min(w, h)
        x, y = (w - side) // 2, (h - side) // 2
        return x, y, x + side, y + side

    return save_crops(paths, folder, box, lambda index, path: f"{index:03d}_{path.stem}.png")


class AppModel:
    """The app's model folder as the page runs it: the mean logit of its model file(s)."""

    def __init__(self, folder: Path):
        self.folder = folder
        _, self.sidecar, _ = read_app_folder(folder)
        self.size = int(self.sidecar["input_size"])

    def predict(self, images: np.ndarray) -> np.ndarray:
        return app_logits(self.folder, images)


def near_threshold(root: Path, model, sidecar: dict, exclude: set, n: int, pool: int = 300) -> list[Path]:
    """The n images (of the first ``pool`` by id, not in ``exclude``) whose logits lie nearest the threshold:
    inside the refer band when it is wide enough, so the app's third answer is tested on real images."""
    present = sorted(p for p in (root / "images").glob("*.jpg") if p not in exclude)[:pool]
    logits = model.predict(load_images([str(p) for p in present], model.size))
    order = np.argsort(np.abs(logits - float(sidecar["threshold_logit"])), kind="stable")
    return [present[i] for i in order[:n]]


def non_square_copies(paths: list[Path], folder: Path) -> list[Path]:
    """Copies cut to landscape and portrait: the app must crop the same centre square."""
    def box(index, w, h):
        return (0, h // 8, w, h - h // 5) if index % 2 == 0 else (w // 6, 0, w - w // 10, h)

    return save_crops(paths, folder, box,
                      lambda index, path: f"{path.stem}_{'wide' if index % 2 == 0 else 'tall'}.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--app", default=str(REPO / "app/public/model"), help="the app's model folder")
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/ham10000"))
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--refer", type=int, default=0, help="also the n images nearest the threshold")
    parser.add_argument("--non-square", type=int, default=0, help="also n non-square copies (written to --work)")
    parser.add_argument("--work", help="folder for the non-square copies")
    parser.add_argument("--grid", action="store_true", help="also the decision for a grid of logits")
    parser.add_argument("--out", required=True, help="JSON file to write (stdout carries runtime logs)")
    args = parser.parse_args()
    model = AppModel(Path(args.app))
    sidecar = model.sidecar
    paths = pick_images(Path(args.data), args.n)
    kinds = ["picked"] * len(paths)
    if args.refer:
        near = near_threshold(Path(args.data), model, sidecar, set(paths), args.refer)
        paths, kinds = paths + near, kinds + ["near_threshold"] * len(near)
    if args.non_square:
        wide = non_square_copies(paths[:args.non_square], Path(args.work))
        paths, kinds = paths + wide, kinds + ["non_square"] * len(wide)
    size = model.size
    with tempfile.TemporaryDirectory() as tmp:
        # What the app must compute: the training pipeline's pixels of the square the app crops.
        logits = model.predict(load_images([str(p) for p in centre_squares(paths, Path(tmp))], size))
    tf_logits = model.predict(load_images([str(p) for p in paths], size))
    rows = [{"path": str(p), "kind": k, "logit": float(z), "probability": shown_probability(float(z), sidecar),
             "decision": decision(float(z), sidecar), "logit_tf_decode": float(t),
             "probability_tf_decode": shown_probability(float(t), sidecar)}
            for p, k, z, t in zip(paths, kinds, np.asarray(logits), np.asarray(tf_logits))]
    payload = {"images": rows, "sidecar": sidecar}
    if args.grid:  # the rule itself, on logits around the threshold and the band's edges
        z0, margin = float(sidecar["threshold_logit"]), float(sidecar.get("refer_margin_logit") or 0.0)
        t = float(sidecar.get("temperature") or 1.0)
        grid = sorted({*np.linspace(z0 - 4, z0 + 4, 401).tolist(), z0, z0 + margin * t, z0 - margin * t,
                       np.nextafter(z0 + margin * t, -np.inf), np.nextafter(z0 - margin * t, np.inf)})
        payload["grid"] = [{"logit": z, "decision": decision(z, sidecar), "probability": shown_probability(z, sidecar)}
                           for z in grid]
    Path(args.out).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
