"""One decoding everywhere: training/evaluate (TensorFlow), the Pi tool and the edge image (Pillow + numpy).

The app's JavaScript resize is held to the same pixels by app/tests; here the two Python paths and the
shipped models' logits through ``evaluate`` and ``tools/benchmark_tflite.py``.
"""

import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO, SHARED_HAM
from melanoma_tf.pipeline import load_images

sys.path.insert(0, str(REPO / "tools"))
import benchmark_tflite  # noqa: E402

SHARED_ISIC = SHARED_HAM.parent / "isic2017"
SHIPPED = REPO / "results" / "reference_ham10000"


def real_jpegs(n_each: int) -> list[Path]:
    ham = sorted((SHARED_HAM / "images").glob("*.jpg"))[:n_each]
    isic = sorted((SHARED_ISIC / "images").glob("*.jpg"))[:n_each]
    if len(ham) < n_each or len(isic) < n_each:
        pytest.skip(f"real HAM10000 / ISIC 2017 images not found under {SHARED_HAM.parent}")
    return ham + isic


@pytest.mark.realdata
@pytest.mark.parametrize("size", [224, 160, 128])
def test_training_and_the_pi_tool_see_the_same_pixels_on_real_jpegs(size):
    """224 px HAM10000 and 256 px ISIC 2017 JPEGs: TensorFlow's pipeline and the tool agree to the grey level.

    Before the one-decoding change TensorFlow used its fast DCT (about 1 grey level off Pillow's, up to 6) and the
    tool Pillow's own bilinear resize.
    """
    paths = real_jpegs(10)
    tf_pixels = load_images([str(p) for p in paths], size)
    tool_pixels = np.stack([benchmark_tflite.load_image(p, size) for p in paths])
    assert tf_pixels.shape == tool_pixels.shape == (20, size, size, 3)
    assert np.array_equal(tf_pixels, tool_pixels), f"{int((tf_pixels != tool_pixels).sum())} values differ"


def _write(path: Path, array: np.ndarray, **kwargs) -> Path:
    Image.fromarray(array).save(path, **kwargs)
    return path


def test_the_same_pixels_for_other_modes_shapes_and_formats(tmp_path):
    """Grey-scale and CMYK JPEGs, PNG, non-square, up- and downscaling: one resize, one rounding."""
    rng = np.random.default_rng(3)
    smooth = np.kron(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), np.ones((7, 5, 1), np.uint8))  # 210 x 200
    files = [
        _write(tmp_path / "noise.png", rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)),
        _write(tmp_path / "smooth.jpg", smooth, quality=90),
        _write(tmp_path / "grey.jpg", smooth[..., 0], quality=85),
        tmp_path / "cmyk.jpg",
        _write(tmp_path / "small.png", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)),
    ]
    Image.fromarray(smooth).convert("CMYK").save(files[3], quality=90)
    for size in (64, 48):
        tf_pixels = load_images([str(p) for p in files], size)
        tool_pixels = np.stack([benchmark_tflite.load_image(p, size) for p in files])
        assert np.array_equal(tf_pixels, tool_pixels), [
            f.name for f, a, b in zip(files, tf_pixels, tool_pixels) if not np.array_equal(a, b)]
    # A grey-scale JPEG becomes three equal channels in both.
    assert np.array_equal(tool_pixels[2][..., 0], tool_pixels[2][..., 2])


def test_the_tool_refuses_or_skips_an_unreadable_image_naming_it(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _write(images / "good.png", np.full((8, 8, 3), 100, np.uint8))
    (images / "empty.jpg").write_bytes(b"")
    cut = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 50, np.uint8)).save(cut, format="JPEG")
    (images / "cut.jpg").write_bytes(cut.getvalue()[:300])
    with pytest.raises(ValueError, match="empty.jpg"):
        benchmark_tflite.load_image(images / "empty.jpg", 16)
    labelled = [(images / "good.png", 0), (images / "empty.jpg", 1), (images / "cut.jpg", 1)]
    with pytest.raises(SystemExit, match="empty.jpg: not a readable image"):
        benchmark_tflite.decode_labelled(labelled, 16)
    decoded, skipped = benchmark_tflite.decode_labelled(labelled, 16, on_corrupt="skip")
    assert [p.name for p, _, _ in decoded] == ["good.png"] and sorted(skipped) == ["cut.jpg", "empty.jpg"]


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("model, tolerance", [("student_fp16.tflite", 1e-4), ("student_int8.tflite", 0.0)])
def test_evaluate_and_the_pi_tool_give_the_same_logits(model, tolerance, tmp_path):
    """The shipped models on 20 real JPEGs: float logits within 1e-4, int8 output steps identical."""
    from melanoma_tf.evaluation import evaluate

    paths = real_jpegs(10)
    images = tmp_path / "images"
    images.mkdir()
    for p in paths:
        (images / p.name).symlink_to(p)
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"image_id": [p.stem for p in paths], "label": [i % 2 for i in range(len(paths))]}).to_csv(
        labels, index=False)
    evaluate(model_path=str(SHIPPED / model), images=str(images), labels=str(labels), out=str(tmp_path / "eval"),
             n_boot=20, gradcam=0, latency_runs=1)
    evaluated = pd.read_csv(tmp_path / "eval" / "predictions.csv").set_index("image_id")["logit"]
    out = tmp_path / "tool.csv"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark_tflite.py"), str(SHIPPED / model),
                             "--runs", "1", "--warmup", "0", "--images", str(images), "--labels", str(labels),
                             "--predictions", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    with open(out, newline="") as handle:
        tool = {row["image_id"]: float(row["logit"]) for row in csv.DictReader(handle)}
    assert sorted(tool) == sorted(evaluated.index)
    gaps = np.array([abs(tool[i] - evaluated[i]) for i in tool])
    assert gaps.max() <= tolerance, f"largest logit gap {gaps.max():.2e}"


def test_the_pi_tool_computes_the_packages_metrics():
    """The tool runs without the package, so it carries its own ROC-AUC and ECE: they must be the package's."""
    from melanoma_tf import metrics as M

    rng = np.random.default_rng(4)
    z = rng.normal(0, 2, 500)
    y = (rng.random(500) < M.sigmoid(2.5 * z)).astype(int)  # under-confident: the error changes sign across bins,
    p = M.sigmoid(z)                                          # so the bin count matters
    p[:40] = 0.5  # ties
    assert abs(M.ece(y, p, n_bins=15) - M.ece(y, p)) > 1e-3
    assert benchmark_tflite.expected_calibration_error(y, p) == pytest.approx(M.ece(y, p), abs=1e-12)
    assert benchmark_tflite.roc_auc(y, p) == pytest.approx(M.roc_auc(y, p), abs=1e-12)
