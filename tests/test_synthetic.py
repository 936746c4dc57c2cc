"""The synthetic dataset: HAM10000 layout, reproducible, melanomas irregular and multicoloured."""

import subprocess
import sys

import numpy as np
import pandas as pd
from PIL import Image

from conftest import REPO
from melanoma_tf import data as D
from melanoma_tf import synthetic


def test_layout_reproducible_and_reused(tmp_path):
    a = synthetic.generate(tmp_path / "a", n_lesions=30, image_size=32, seed=3)
    b = synthetic.generate(tmp_path / "b", n_lesions=30, image_size=32, seed=3)
    meta = D.read_metadata(a / "HAM10000_metadata.csv")
    assert list(meta.columns) == ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"]
    assert (a / "HAM10000_metadata.csv").read_text() == (b / "HAM10000_metadata.csv").read_text()
    first = meta["image_id"].iloc[0]
    assert (a / "images" / f"{first}.jpg").read_bytes() == (b / "images" / f"{first}.jpg").read_bytes()
    stamp = (a / "images" / f"{first}.jpg").stat().st_mtime_ns
    synthetic.generate(tmp_path / "a", n_lesions=30, image_size=32, seed=3)
    assert (a / "images" / f"{first}.jpg").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert Image.open(a / "images" / f"{first}.jpg").size == (32, 32)


def test_melanomas_have_more_colours_than_naevi(tmp_path):
    root = synthetic.generate(tmp_path, n_lesions=80, melanoma_fraction=0.5, image_size=64, seed=1)
    meta = pd.read_csv(root / "HAM10000_metadata.csv")

    def colour_spread(image_id):
        pixels = np.asarray(Image.open(root / "images" / f"{image_id}.jpg"), dtype=float).reshape(-1, 3)
        grey = pixels.mean(axis=1)
        lesion = pixels[grey < 0.75 * np.median(grey)]  # darker than the skin
        return lesion.std(axis=0).mean()

    mel = [colour_spread(i) for i in meta.loc[meta["dx"] == "mel", "image_id"]]
    nv = [colour_spread(i) for i in meta.loc[meta["dx"] == "nv", "image_id"]]
    assert np.median(mel) > 1.3 * np.median(nv)


def test_make_synthetic_tool(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "make_synthetic.py"), str(tmp_path / "s"),
                             "--lesions", "12", "--size", "24"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"data.root: {tmp_path / 's'}"
    assert len(pd.read_csv(tmp_path / "s" / "HAM10000_metadata.csv")) >= 12
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "make_synthetic.py"), str(tmp_path / "t"),
                          "--size", "4"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--size" in bad.stderr
