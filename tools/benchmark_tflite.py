#!/usr/bin/env python3
"""Benchmark TFLite melanoma models on a Raspberry Pi (or any machine): latency, memory, accuracy.

    python benchmark_tflite.py MODEL.tflite [MODEL2.tflite ...] [--threads N] [--warmup N] [--runs N]
        [--images DIR --labels CSV [--on-corrupt error|skip] [--predictions OUT.csv]] [--json OUT] [--csv OUT]

Needs only numpy and one TFLite runtime: ``ai_edge_litert`` (pip install ai-edge-litert),
else ``tflite_runtime``, else ``tensorflow.lite``. It never imports melanoma_tf.
With ``--images`` it also scores ROC-AUC, sensitivity and specificity, using the
threshold from the model's sidecar JSON (``MODEL.json`` beside ``MODEL.tflite``);
images are decoded and resized exactly as the package trains (Pillow with libjpeg's accurate
DCT, TensorFlow's antialiased bilinear resize re-implemented below, rounded to whole grey levels).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np


def load_runtime():
    """(Interpreter class, runtime name, version): ai_edge_litert, tflite_runtime, or tensorflow.lite."""
    try:
        from ai_edge_litert import interpreter as litert

        import ai_edge_litert

        return litert.Interpreter, "ai_edge_litert", getattr(ai_edge_litert, "__version__", "unknown")
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        import tflite_runtime

        return Interpreter, "tflite_runtime", getattr(tflite_runtime, "__version__", "unknown")
    except ImportError:
        pass
    try:
        import tensorflow as tf

        return tf.lite.Interpreter, "tensorflow.lite", tf.__version__
    except ImportError:
        raise SystemExit("error: no TFLite runtime found; install one: pip install ai-edge-litert") from None


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (ru_maxrss is KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1e3


def quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = detail["dtype"]
    if np.issubdtype(dtype, np.floating):
        return x.astype(dtype)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, detail: dict) -> np.ndarray:
    if np.issubdtype(detail["dtype"], np.floating):
        return q.astype(np.float32)
    scale, zero = detail["quantization"]
    return (q.astype(np.float32) - zero) * scale


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney ROC-AUC with ties counted one half."""
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if not n_pos or not n_neg:
        return float("nan")
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def resample_spans(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """First source index and weights (``out_size x span``) of TensorFlow's antialiased bilinear resize on one axis.

    ``tf.image.resize(..., "bilinear", antialias=True)`` is ScaleAndTranslate with a triangle kernel
    widened by the downscale factor, sampled at pixel centres and normalised per output pixel. Every
    step is done in float32 and in TensorFlow's order, so that the rounded pixels agree exactly.
    """
    f32 = np.float32
    scale = f32(out_size) / f32(in_size)
    inv_scale = f32(1.0) / scale
    kernel_scale = max(inv_scale, f32(1.0))
    span = min(2 * int(np.ceil(kernel_scale)) + 1, in_size)
    starts = np.zeros(out_size, np.int64)
    weights = np.zeros((out_size, span), np.float32)
    for i in range(out_size):
        centre = f32(i + 0.5) * inv_scale
        start = min(max(int(np.ceil(centre - kernel_scale - f32(0.5))), 0), in_size - 1)
        end = min(max(int(np.floor(centre + kernel_scale - f32(0.5))), 0), in_size - 1) + 1
        total = f32(0.0)
        for source in range(start, end):
            w = max(f32(0.0), f32(1.0) - abs((f32(source) + f32(0.5) - centre) * (f32(1.0) / kernel_scale)))
            weights[i, source - start] = w
            total = f32(total + w)
        if total != 0:
            weights[i] *= f32(1.0) / total
        starts[i] = start
    return starts, weights


def _resample_axis(image: np.ndarray, size: int, axis: int) -> np.ndarray:
    """One pass of the separable resize along ``axis`` (0: rows, 1: columns), float32, summed in span order."""
    starts, weights = resample_spans(image.shape[axis], size)
    moved = np.moveaxis(image, axis, 0)
    out = np.zeros((size,) + moved.shape[1:], np.float32)
    shape = (size,) + (1,) * (moved.ndim - 1)
    for k in range(weights.shape[1]):
        index = np.minimum(starts + k, moved.shape[0] - 1)  # past the span's end the weight is 0
        out += weights[:, k].reshape(shape) * moved[index]
    return np.moveaxis(out, 0, axis)


def resize_like_training(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``H x W x 3`` to ``size x size x 3`` uint8, as the training pipeline resizes (rows first)."""
    image = _resample_axis(pixels.astype(np.float32), size, 0)
    image = _resample_axis(image, size, 1)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def load_image(path: Path, size: int) -> np.ndarray:
    """One image file as the model input: float32 RGB in [0, 255], ``size x size``.

    The same pixels as training and evaluation: Pillow decodes JPEGs with
    libjpeg's accurate integer DCT (TensorFlow is told to do the same), then the resize above.
    Raises ``ValueError`` naming the file when it does not decode.
    """
    try:
        from PIL import Image
    except ImportError:
        raise SystemExit("error: scoring images needs Pillow (pip install pillow)") from None
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
    return resize_like_training(pixels, size).astype(np.float32)


def decode_labelled(labelled: list[tuple[Path, int]], size: int,
                    on_corrupt: str = "error") -> tuple[list[tuple[Path, int, np.ndarray]], list[str]]:
    """Every labelled image decoded before any is scored: (path, label, pixels), and the names skipped.

    A file that does not decode stops the run with an error naming it (``on_corrupt="error"``), or is
    left out and named in the result (``"skip"``), as ``data.on_corrupt`` does in training.
    """
    decoded, skipped = [], []
    for path, label in labelled:
        try:
            decoded.append((path, label, load_image(path, size)))
        except ValueError as err:
            if on_corrupt == "error":
                raise SystemExit(f"error: {err} (--on-corrupt skip leaves such files out)") from None
            skipped.append(path.name)
    if skipped:
        print(f"warning: {len(skipped)} unreadable image(s) skipped, first: {skipped[0]}", file=sys.stderr)
    if not decoded:
        raise SystemExit("error: no readable image to score")
    return decoded, skipped


def read_labels(images: Path, labels: Path) -> list[tuple[Path, int]]:
    if not labels.is_file():
        raise SystemExit(f"error: labels file not found: {labels}")
    if not images.is_dir():
        raise SystemExit(f"error: image folder not found: {images}")
    files = {p.stem: p for p in images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
    rows = []
    with open(labels, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "image_id" not in reader.fieldnames or "label" not in reader.fieldnames:
            raise SystemExit(f"error: {labels}: expected columns image_id,label")
        for line, row in enumerate(reader, start=2):
            image_id = Path(row["image_id"]).stem
            if image_id not in files:
                raise SystemExit(f"error: {labels}: row {line}: no image {image_id!r} in {images}")
            if row["label"] not in ("0", "1"):
                raise SystemExit(f"error: {labels}: row {line}: label must be 0 or 1, got {row['label']!r}")
            rows.append((files[image_id], int(row["label"])))
    return rows


_PROBE = """
import resource, sys
import numpy as np
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:
    from tflite_runtime.interpreter import Interpreter
interpreter = Interpreter(model_path=sys.argv[1])
interpreter.allocate_tensors()
for d in interpreter.get_input_details():
    interpreter.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
interpreter.invoke()
"""


def check_model_file(model_path: Path) -> None:
    """Refuses a damaged copy before the runtime opens it (a cut-short file crashed it or ate the Pi's memory).

    A sidecar beside the model vouches for it by size and sha256, which catch any damaged copy of a model
    that ``quantize`` wrote; without one, the model is run once in a child process with a memory cap first.
    """
    import hashlib
    import subprocess
    import sys

    blob = model_path.read_bytes()
    if len(blob) < 8 or blob[4:8] != b"TFL3":
        raise SystemExit(f"error: {model_path} is not a valid TFLite model (no TFL3 identifier)")
    sidecar_path = model_path.with_suffix(".json")
    if sidecar_path.is_file():
        try:
            sidecar = json.loads(sidecar_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SystemExit(f"error: {sidecar_path}: invalid sidecar JSON: {err}") from None
        if sidecar.get("size_bytes") not in (None, len(blob)) or (
                sidecar.get("sha256") and hashlib.sha256(blob).hexdigest() != sidecar["sha256"]):
            raise SystemExit(f"error: {model_path}: {len(blob):,} bytes / sha256 do not match its sidecar "
                             f"{sidecar_path.name}: a partial or damaged copy")
        if sidecar.get("sha256"):
            return
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE, str(model_path)], capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"error: {model_path}: one inference did not finish in 120 s: a corrupt file") from None
    if probe.returncode != 0:
        raise SystemExit(f"error: {model_path}: the TFLite runtime cannot run it (exit {probe.returncode}): "
                         "a corrupt file")


def benchmark(model_path: Path, threads: int, warmup: int, runs: int, labelled=None,
              on_corrupt: str = "error") -> dict:
    interpreter_cls, runtime, version = load_runtime()
    if not model_path.is_file():
        raise SystemExit(f"error: model file not found: {model_path}")
    check_model_file(model_path)
    try:
        interpreter = interpreter_cls(model_path=str(model_path), num_threads=threads)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as err:
        raise SystemExit(f"error: {model_path} is not a valid TFLite model: {err}") from None
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    shape = [int(d) for d in inp["shape"]]
    x = quantize(np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32), inp)
    for _ in range(warmup):
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
    times = []
    for _ in range(runs):
        interpreter.set_tensor(inp["index"], x)
        start = time.perf_counter()
        interpreter.invoke()
        times.append((time.perf_counter() - start) * 1e3)
    t = np.asarray(times)
    result = {
        "model": str(model_path), "runtime": runtime, "runtime_version": version, "machine": platform.machine(),
        "threads": threads, "size_mb": os.path.getsize(model_path) / 1e6, "input_shape": shape,
        "input_dtype": np.dtype(inp["dtype"]).name, "output_dtype": np.dtype(out["dtype"]).name,
        "runs": runs, "warmup": warmup, "latency_ms_min": float(t.min()), "latency_ms_median": float(np.median(t)),
        "latency_ms_p90": float(np.percentile(t, 90)), "latency_ms_p99": float(np.percentile(t, 99)),
        "latency_ms_max": float(t.max()),
    }
    if labelled:
        sidecar_path = model_path.with_suffix(".json")
        if not sidecar_path.is_file():
            raise SystemExit(f"error: scoring needs the threshold from the sidecar {sidecar_path}")
        sidecar = json.loads(sidecar_path.read_text())
        threshold = float(sidecar["threshold"])
        # The sidecar's validation-fitted calibration, so the probability means what it means everywhere else.
        calibration = sidecar.get("calibration") or {}
        a, b = (float(calibration["a"]), float(calibration["b"])) if calibration.get("method") == "platt" else (
            1.0 / float(sidecar.get("temperature") or 1.0), 0.0)
        decoded, skipped = decode_labelled(labelled, shape[1], on_corrupt)
        scores, labels, calibrated, logits = [], [], [], []
        for path, label, image in decoded:
            interpreter.set_tensor(inp["index"], quantize(image[None], inp))
            interpreter.invoke()
            logit = float(dequantize(interpreter.get_tensor(out["index"]), out).reshape(-1)[0])
            logits.append({"image_id": path.stem, "label": label, "logit": logit})
            scores.append(1 / (1 + np.exp(-logit)))
            calibrated.append(1 / (1 + np.exp(-(a * logit + b))))
            labels.append(label)
        y, s = np.asarray(labels), np.asarray(scores)
        called = s >= threshold
        result["predictions"] = logits
        result.update({"n_images": len(y), "n_skipped_unreadable": len(skipped), "skipped_unreadable": skipped,
                       "threshold": threshold, "roc_auc": roc_auc(y, s),
                       "ece_calibrated": expected_calibration_error(y, np.asarray(calibrated)),
                       "calibration": f"sigmoid({a:.4g} * logit + {b:.4g})",
                       "sensitivity": float(called[y == 1].mean()) if (y == 1).any() else float("nan"),
                       "specificity": float((~called[y == 0]).mean()) if (y == 0).any() else float("nan")})
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """ECE over equal-mass bins, as the package computes it (this tool runs without the package)."""
    order = np.argsort(p, kind="stable")
    total = 0.0
    for chunk in np.array_split(order, bins):
        if len(chunk):
            total += len(chunk) * abs(float(p[chunk].mean()) - float(y[chunk].mean()))
    return total / len(p)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help=".tflite files")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--images", help="image folder (with --labels) to score accuracy")
    parser.add_argument("--labels", help="CSV image_id,label (0/1)")
    parser.add_argument("--on-corrupt", choices=("error", "skip"), default="error",
                        help="an image that does not decode: stop with its name (default), or leave it out")
    parser.add_argument("--predictions", help="write each model's per-image logits here (CSV: model,image_id,label,logit)")
    parser.add_argument("--json", help="write results as JSON here")
    parser.add_argument("--csv", help="write results as CSV here")
    args = parser.parse_args(argv)
    if (args.images is None) != (args.labels is None):
        parser.error("--images and --labels go together")
    if args.predictions and args.images is None:
        parser.error("--predictions needs --images and --labels")
    if args.runs < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--runs and --threads must be >= 1, --warmup >= 0")
    labelled = read_labels(Path(args.images), Path(args.labels)) if args.images else None
    results = [benchmark(Path(m), args.threads, args.warmup, args.runs, labelled, args.on_corrupt)
               for m in args.models]
    if args.predictions:
        with open(args.predictions, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["model", "image_id", "label", "logit"])
            writer.writeheader()
            for r in results:
                writer.writerows({"model": Path(r["model"]).name, **row} for row in r["predictions"])
    for r in results:
        r.pop("predictions", None)
    keys = ["model", "runtime", "size_mb", "input_dtype", "latency_ms_median", "latency_ms_p90", "peak_rss_mb"]
    if labelled:
        keys += ["roc_auc", "sensitivity", "specificity", "ece_calibrated"]
    print(f"runtime: {results[0]['runtime']} {results[0]['runtime_version']} on {results[0]['machine']}, "
          f"{args.threads} thread(s), {args.runs} runs after {args.warmup} warm-up")
    print(" | ".join(keys))
    for r in results:
        print(" | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys))
    if args.json:
        # NaN (a rate with no images of its class) is written as null: JSON has no NaN.
        clean = [{k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in r.items()} for r in results]
        Path(args.json).write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n")
    if args.csv:
        fields = sorted({k for r in results for k in r})
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
