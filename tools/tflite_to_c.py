#!/usr/bin/env python3
"""Turn a TFLite flatbuffer (and its sidecar JSON) into C++ sources for the TFLite-Micro harness.

    python tools/tflite_to_c.py MODEL.tflite --out edge/generated [--image IMAGE.jpg]

Writes ``model_data.h`` / ``model_data.cc`` (the 16-byte aligned model array,
its length, input size, input/output quantization, the validation-chosen
threshold and referral margin, and an op resolver registering only the ops
the model uses) and, with ``--image``, ``test_image.h`` / ``test_image.cc`` (an
int8 image quantized with the model's input parameters). Needs numpy and a
TFLite runtime only to list the ops when the sidecar does not.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np

# TFLite builtin op name -> tflite::MicroMutableOpResolver method.
OP_RESOLVER_METHODS = {
    "ADD": "AddAdd", "AVERAGE_POOL_2D": "AddAveragePool2D", "CONCATENATION": "AddConcatenation",
    "CONV_2D": "AddConv2D", "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D", "DEQUANTIZE": "AddDequantize",
    "FULLY_CONNECTED": "AddFullyConnected", "HARD_SWISH": "AddHardSwish", "LOGISTIC": "AddLogistic",
    "MAX_POOL_2D": "AddMaxPool2D", "MAXIMUM": "AddMaximum", "MEAN": "AddMean", "MINIMUM": "AddMinimum",
    "MUL": "AddMul", "PAD": "AddPad", "QUANTIZE": "AddQuantize", "RELU": "AddRelu", "RELU6": "AddRelu6",
    "RESHAPE": "AddReshape", "SOFTMAX": "AddSoftmax", "SUB": "AddSub", "REDUCE_MAX": "AddReduceMax",
}


def list_ops(model_path: Path) -> list[str]:
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:
        import tensorflow as tf

        Interpreter, OpResolverType = tf.lite.Interpreter, tf.lite.experimental.OpResolverType
    interpreter = Interpreter(model_path=str(model_path),
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    return sorted({op["op_name"] for op in interpreter._get_ops_details()})


def c_float(value: float) -> str:
    """A C++ float literal that is valid for every value (``1.0`` must not become ``1f``)."""
    return f"{float(value):.9e}f"


def c_array(data: bytes, per_line: int = 16) -> str:
    lines = []
    for start in range(0, len(data), per_line):
        lines.append("    " + ", ".join(f"0x{b:02x}" for b in data[start:start + per_line]) + ",")
    return "\n".join(lines)


def parse_c_array(text: str, name: str) -> bytes:
    """The bytes of ``name[] = { ... };`` in generated C source (the round-trip check)."""
    match = re.search(rf"{re.escape(name)}\[\]\s*=\s*\{{(.*?)\}};", text, re.S)
    if not match:
        raise ValueError(f"array {name} not found")
    values = re.findall(r"0x([0-9a-fA-F]{2})|(-?\d+)", match.group(1))
    return bytes(int(h, 16) if h else int(d) & 0xFF for h, d in values)


def decision_bounds(sidecar: dict) -> tuple[int, int, int]:
    """``(kThresholdQ, kReferLowQ, kReferHighQ)``: the int8 scores at which the board's decision changes.

    Found by applying the decision rule every other runtime uses (``melanoma_tf.export_app.decision``) to
    each of the 256 int8 scores, so the board decides exactly as ``evaluate``, the app and the Pi tool do
    (rounding the logit thresholds to the integer scale instead moved a band edge by one step).
    """
    from melanoma_tf.export_app import decision

    scale, zero = float(sidecar["output_scale"]), int(sidecar["output_zero_point"])
    scores = np.arange(-128, 128)
    decided = np.array([decision((int(q) - zero) * scale, sidecar) for q in scores])
    melanoma, refer = scores[decided == "melanoma"], scores[decided == "refer"]
    threshold_q = int(melanoma.min()) if len(melanoma) else 128
    low, high = (int(refer.min()), int(refer.max())) if len(refer) else (1, 0)
    rebuilt = np.where((scores >= low) & (scores <= high), "refer",
                       np.where(scores >= threshold_q, "melanoma", "not_melanoma"))
    if not (rebuilt == decided).all():  # cannot happen for a threshold and a symmetric band; refuse if it does
        raise SystemExit("error: the sidecar's decision rule is not three contiguous ranges of int8 scores")
    return threshold_q, low, high


def generate(model_path: Path, out_dir: Path, image: Path | None = None) -> list[Path]:
    if not model_path.is_file():
        raise SystemExit(f"error: model file not found: {model_path}")
    blob = model_path.read_bytes()
    if len(blob) < 8 or blob[4:8] != b"TFL3":
        raise SystemExit(f"error: {model_path} is not a TFLite flatbuffer (no TFL3 identifier)")
    sidecar_path = model_path.with_suffix(".json")
    if not sidecar_path.is_file():
        raise SystemExit(f"error: sidecar {sidecar_path} not found (written by melanoma_tf.quantize)")
    from melanoma_tf.tflite import FlatbufferError, verify_model_file

    try:  # structure, and the sidecar's size and sha256: a damaged copy must not reach a board
        sidecar = verify_model_file(model_path)
    except FlatbufferError as err:
        raise SystemExit(f"error: {err}") from None
    if sidecar.get("input_dtype") != "int8" or sidecar.get("output_dtype") != "int8":
        raise SystemExit(f"error: {model_path} must have int8 input and output for the edge harness "
                         f"(got {sidecar.get('input_dtype')} -> {sidecar.get('output_dtype')}); use int8 or qat")
    ops = sidecar.get("ops") or list_ops(model_path)
    unknown = [op for op in ops if op not in OP_RESOLVER_METHODS]
    if unknown:
        raise SystemExit(f"error: ops without a TFLM resolver entry here: {unknown}")
    size = int(sidecar["input_size"])
    out_scale, out_zero = float(sidecar["output_scale"]), int(sidecar["output_zero_point"])
    threshold_logit = float(sidecar["threshold_logit"])
    margin = float(sidecar.get("refer_margin_logit") or 0.0)
    temperature = float(sidecar.get("temperature") or 1.0)
    # The sidecar's validation-fitted calibration, so the board reports the probability every other runtime does.
    calibration = sidecar.get("calibration") or {}
    cal_a, cal_b = ((float(calibration["a"]), float(calibration["b"])) if calibration.get("method") == "platt"
                    else (1.0 / temperature, 0.0))
    threshold_q, refer_low_q, refer_high_q = decision_bounds(sidecar)
    arena = int(sidecar.get("tflm_arena_bytes") or 0)
    arena_with_headroom = int(math.ceil(max(arena, 1024) * 1.1 / 1024) * 1024)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = f"""// Generated by tools/tflite_to_c.py from {model_path.name}; do not edit.
// sha256 {sidecar.get('sha256', '')}
#ifndef MELANOMA_MODEL_DATA_H_
#define MELANOMA_MODEL_DATA_H_

#include <cstdint>

#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"

extern const unsigned char g_model_data[];
extern const unsigned int g_model_data_len;

constexpr int kModelInputSize = {size};
constexpr float kInputScale = {c_float(sidecar['input_scale'])};
constexpr int kInputZeroPoint = {int(sidecar['input_zero_point'])};
constexpr float kOutputScale = {c_float(out_scale)};
constexpr int kOutputZeroPoint = {out_zero};
// Validation-chosen operating point ({sidecar.get('target_sensitivity', 0.95)} sensitivity):
// melanoma when logit >= {threshold_logit:.6f}, i.e. int8 score >= kThresholdQ.
constexpr int kThresholdQ = {threshold_q};
// Referral band (logit within {margin * temperature:.6f} of the threshold): kReferLowQ <= score <= kReferHighQ
// -> refer to a dermatologist (low > high: no int8 score falls in the band).
constexpr int kReferLowQ = {refer_low_q};
constexpr int kReferHighQ = {refer_high_q};
// Calibrated probability of melanoma = 1 / (1 + exp(-(kCalibrationA * logit + kCalibrationB))),
// fitted on validation ({calibration.get('method', 'temperature')}), as in the sidecar.
constexpr float kCalibrationA = {c_float(cal_a)};
constexpr float kCalibrationB = {c_float(cal_b)};
// Tensor arena measured with the TFLite-Micro interpreter: {arena} bytes (+10% headroom).
constexpr int kTensorArenaSize = {arena_with_headroom};
constexpr int kNumOps = {len(ops)};

// Registers exactly the ops this model uses: {', '.join(ops)}.
inline TfLiteStatus RegisterModelOps(tflite::MicroMutableOpResolver<kNumOps>& resolver) {{
{chr(10).join(f'  if (resolver.{OP_RESOLVER_METHODS[op]}() != kTfLiteOk) return kTfLiteError;' for op in ops)}
  return kTfLiteOk;
}}

#endif  // MELANOMA_MODEL_DATA_H_
"""
    source = f"""// Generated by tools/tflite_to_c.py from {model_path.name}; do not edit.
#include "model_data.h"

alignas(16) const unsigned char g_model_data[] = {{
{c_array(blob)}
}};
const unsigned int g_model_data_len = {len(blob)};
"""
    written = [out_dir / "model_data.h", out_dir / "model_data.cc"]
    written[0].write_text(header)
    written[1].write_text(source)
    if image is not None:
        written += write_test_image(image, out_dir, size, float(sidecar["input_scale"]),
                                    int(sidecar["input_zero_point"]), model_path)
    return written


def reference_score(model_path: Path, q: np.ndarray) -> int:
    """The int8 output of TFLite's reference kernels for the quantized image: the C++ parity target.

    TFLite-Micro implements the reference kernels' arithmetic; TFLite's default
    XNNPACK int8 path rounds differently (several steps apart on MobileNetV3).
    """
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:
        import tensorflow as tf

        Interpreter, OpResolverType = tf.lite.Interpreter, tf.lite.experimental.OpResolverType
    interpreter = Interpreter(model_path=str(model_path), experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], q[None])
    interpreter.invoke()
    return int(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).reshape(-1)[0])


def quantized_image(image: Path, size: int, scale: float, zero: int) -> np.ndarray:
    """The test image as the model's int8 input, decoded and resized as in training (benchmark_tflite.load_image)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchmark_tflite import load_image

    try:
        pixels = load_image(image, size)
    except ValueError as err:
        raise SystemExit(f"error: --image {err}") from None
    return np.clip(np.round(pixels / scale + zero), -128, 127).astype(np.int8)


def write_test_image(image: Path, out_dir: Path, size: int, scale: float, zero: int,
                     model_path: Path) -> list[Path]:
    q = quantized_image(image, size, scale, zero)
    expected = reference_score(model_path, q)
    header = f"""// Generated by tools/tflite_to_c.py from {image.name}; do not edit.
#ifndef MELANOMA_TEST_IMAGE_H_
#define MELANOMA_TEST_IMAGE_H_
#include <cstdint>
extern const int8_t g_test_image[];
extern const unsigned int g_test_image_len;
// The TFLite interpreter's int8 melanoma score for this image (the C++ parity target).
constexpr int kTestImageExpectedScore = {expected};
#endif  // MELANOMA_TEST_IMAGE_H_
"""
    source = f"""// Generated by tools/tflite_to_c.py from {image.name}; do not edit.
#include "test_image.h"

const int8_t g_test_image[] = {{
{chr(10).join('    ' + ', '.join(str(int(v)) for v in q.reshape(-1)[i:i + 24]) + ',' for i in range(0, q.size, 24))}
}};
const unsigned int g_test_image_len = {q.size};
"""
    paths = [out_dir / "test_image.h", out_dir / "test_image.cc"]
    paths[0].write_text(header)
    paths[1].write_text(source)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="int8 .tflite (with its sidecar .json beside it)")
    parser.add_argument("--out", required=True, help="output folder, e.g. edge/generated")
    parser.add_argument("--image", help="an image to embed as the test input")
    args = parser.parse_args(argv)
    for path in generate(Path(args.model), Path(args.out), Path(args.image) if args.image else None):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
