"""A synthetic dermoscopy-like dataset in the HAM10000 layout.

Each image is skin (a warm background with shading, pores and the odd hair)
with one pigmented lesion. Benign lesions are round-ish with a smooth border
and one or two close browns; melanomas have irregular, asymmetric borders and
several colours (dark brown, black, blue-grey, red). The classes overlap a
little (some naevi are irregular, some melanomas nearly round), so a model has
to learn shape and colour rather than a single pixel statistic.

The output is a metadata CSV plus an ``images/`` folder, read by the same
reader as real HAM10000, so the quickstart and the tests exercise the real
data path.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from melanoma_tf.data import DX_CLASSES
from melanoma_tf.files import write_atomic

# Benign diagnoses drawn for non-melanoma lesions, roughly HAM10000's mix.
_BENIGN_DX = ("nv", "nv", "nv", "nv", "bkl", "bcc", "akiec", "df", "vasc")
# RGB palettes (0-255) per diagnosis; melanoma draws several of its colours.
_PALETTES = {
    "nv": [(120, 75, 45), (100, 60, 35), (140, 90, 60)],
    "bkl": [(160, 120, 80), (140, 105, 70)],
    "bcc": [(190, 120, 120), (170, 110, 115)],
    "akiec": [(185, 110, 90), (170, 100, 85)],
    "df": [(150, 100, 80), (130, 90, 70)],
    "vasc": [(170, 40, 60), (150, 30, 50)],
    "mel": [(60, 35, 25), (25, 20, 20), (95, 105, 130), (150, 50, 45), (110, 65, 40)],
}


def _lesion_params(rng: np.random.Generator, dx: str) -> dict:
    melanoma = dx == "mel"
    n_harm = 8
    amplitude = np.zeros(n_harm)
    if melanoma and rng.random() > 0.1:
        amplitude[2:] = rng.uniform(0.04, 0.16, n_harm - 2) / np.sqrt(np.arange(2, n_harm))
        amplitude[1] = rng.uniform(0.05, 0.2)  # asymmetry
    else:
        amplitude[1:3] = rng.uniform(0.0, 0.06, 2)
        if rng.random() < 0.1:  # an irregular naevus
            amplitude[3:6] = rng.uniform(0.02, 0.08, 3)
    palette = _PALETTES[dx]
    if melanoma:
        k = rng.integers(2, 5)
        colours = [palette[i] for i in rng.choice(len(palette), size=k, replace=False)]
    else:
        k = 1 if rng.random() < 0.7 else 2
        colours = [palette[i] for i in rng.choice(len(palette), size=min(k, len(palette)), replace=False)]
    return {
        "radius": rng.uniform(0.18, 0.32) * (1.15 if melanoma else 1.0),
        "amplitude": amplitude,
        "phase": rng.uniform(0, 2 * np.pi, n_harm),
        "colours": np.array(colours, dtype=np.float64),
        "blob_centres": rng.uniform(-0.6, 0.6, (len(colours), 2)),
        "skin": np.array([225, 180, 155]) + rng.normal(0, 12, 3),
        "hairs": int(rng.poisson(0.7)),
    }


def _render(params: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draws one lesion image (uint8, size x size x 3) with a random view of the lesion."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    cx, cy = rng.normal(0, 0.04, 2)
    x, y = xx - cx, yy - cy
    theta = np.arctan2(y, x) + angle
    r = np.hypot(x, y)
    harmonics = np.arange(len(params["amplitude"]))
    border = params["radius"] * (1 + np.tensordot(
        np.stack([np.cos(k * theta + p) for k, p in zip(harmonics, params["phase"])], -1),
        params["amplitude"], axes=([-1], [0])))
    # Soft-edged mask: 1 inside the lesion, 0 outside.
    inside = 1 / (1 + np.exp((r - border) / (0.012 + 0.01 * rng.random())))

    shade = 1 + 0.08 * (xx * rng.normal() + yy * rng.normal())
    image = params["skin"][None, None, :] * shade[..., None]
    image = image + rng.normal(0, 4, (size, size, 3))

    colours = params["colours"]
    # Each colour owns a blob inside the lesion; weights fall off with distance.
    rel = np.stack([x, y], -1) / max(params["radius"], 1e-3)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centres = params["blob_centres"] @ rot.T
    weights = np.stack([np.exp(-np.sum((rel - c) ** 2, -1) / 0.25) for c in centres], -1) + 1e-6
    weights /= weights.sum(-1, keepdims=True)
    lesion = np.tensordot(weights, colours, axes=([-1], [0]))
    lesion *= (1 + 0.1 * (r / max(params["radius"], 1e-3)))[..., None]  # lighter towards the rim
    lesion += rng.normal(0, 6, lesion.shape)
    image = image * (1 - inside[..., None]) + lesion * inside[..., None]

    for _ in range(params["hairs"]):  # thin dark curves across the image
        p0 = rng.uniform(-0.5, 0.5, 2)
        direction = rng.normal(size=2)
        direction /= np.linalg.norm(direction) + 1e-9
        normal = np.array([-direction[1], direction[0]])
        dist = np.abs((xx - p0[0]) * normal[0] + (yy - p0[1]) * normal[1]
                      + 0.3 * ((xx - p0[0]) * direction[0] + (yy - p0[1]) * direction[1]) ** 2)
        hair = np.exp(-(dist * size / 0.7) ** 2)
        image = image * (1 - 0.7 * hair[..., None]) + 40 * 0.7 * hair[..., None]
    return np.clip(image, 0, 255).astype(np.uint8)


def generate(out_dir: str | Path, n_lesions: int = 400, melanoma_fraction: float = 0.25,
             image_size: int = 96, second_image_fraction: float = 0.2, seed: int = 0) -> Path:
    """Writes a synthetic dataset (``HAM10000_metadata.csv`` + ``images/``).

    The folder is reused when it already holds a complete dataset made with the
    same arguments (the CSV is written last, so its presence marks completion).

    Args:
      out_dir: where to write.
      n_lesions: lesions to draw; some get a second image (a sibling in the same lesion).
      melanoma_fraction: share of melanoma lesions.
      image_size: side in pixels.
      second_image_fraction: share of lesions with two images.
      seed: generator seed.

    Returns:
      The dataset folder (the value for ``data.root``).
    """
    out_dir = Path(out_dir)
    params = {"n_lesions": n_lesions, "melanoma_fraction": melanoma_fraction, "image_size": image_size,
              "second_image_fraction": second_image_fraction, "seed": seed, "version": 1}
    stamp = out_dir / "synthetic.json"
    csv_path = out_dir / "HAM10000_metadata.csv"
    if csv_path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == params:
        return out_dir
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    image_counter = 0
    sexes = ("male", "female")
    sites = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face")
    for lesion_index in range(n_lesions):
        dx = "mel" if rng.random() < melanoma_fraction else _BENIGN_DX[rng.integers(len(_BENIGN_DX))]
        assert dx in DX_CLASSES
        lesion = _lesion_params(rng, dx)
        n_images = 2 if rng.random() < second_image_fraction else 1
        age = float(np.clip(rng.normal(62 if dx == "mel" else 48, 15), 5, 85) // 5 * 5)
        sex, site = sexes[rng.integers(2)], sites[rng.integers(len(sites))]
        for _ in range(n_images):
            image_id = f"ISIC_{9000000 + image_counter:07d}"
            image_counter += 1
            pixels = _render(lesion, image_size, rng)
            buffer = _jpeg_bytes(pixels)
            write_atomic(image_dir / f"{image_id}.jpg", buffer)
            rows.append({"lesion_id": f"HAM_{9000000 + lesion_index:07d}", "image_id": image_id, "dx": dx,
                         "dx_type": "histo" if dx == "mel" else "follow_up", "age": age, "sex": sex,
                         "localization": site, "dataset": "synthetic"})
    table = pd.DataFrame(rows)
    write_atomic(stamp, json.dumps(params))
    write_atomic(csv_path, table.to_csv(index=False, lineterminator="\n"))
    return out_dir


def _jpeg_bytes(pixels: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def default_dir(base: str | Path, **params) -> Path:
    """A per-parameter folder under base, so different settings never share files."""
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return Path(base) / f"synthetic-{key}"
