#!/usr/bin/env python3
"""Inference speed: ResNet50 teacher fp32 vs MobileNetV3-Small student fp32 / fp16 / int8, TFLite, batch 1, 1 thread.

    python tools/benchmark_inference.py [--size 224] [--runs 100] [--warmup 10] [--json OUT] \
        [--student-weights ../shared/weights/mobilenet_v3_small_224_1.0_uint8.tflite --calibration-images DIR]

Builds both models, converts them in one run, times each flatbuffer with one
interpreter thread, and prints median latency, sizes, how many XNNPACK partitions
the runtime made, and the speed-up ratios measured in this run. Float speed does
not depend on the weights; int8 speed does: XNNPACK declines int8 ops whose scales
are out of its range, which random weights and noise calibration produce. Pass
real student weights and lesion images to time the int8 graph a trained model has. Targets
(issue 6): int8 student >= 30x faster than the fp32 teacher, >= 2x faster
than the fp32 student.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--student-weights", help="student.weights (e.g. the ImageNet .tflite); default random")
    parser.add_argument("--calibration-images", help="folder of images for int8 calibration; default noise")
    args = parser.parse_args(argv)

    from melanoma_tf import config as C
    from melanoma_tf import cost, models, quantize
    from melanoma_tf.backend import keras

    keras.utils.set_random_seed(0)
    size = args.size
    calibration = np.random.default_rng(0).uniform(0, 255, (16, size, size, 3)).astype(np.float32)
    if args.calibration_images:
        from melanoma_tf.pipeline import load_images

        files = sorted(p for p in Path(args.calibration_images).iterdir() if p.suffix.lower() in (".jpg", ".png"))
        calibration = load_images([str(p) for p in files[:64]], size)
    teacher = models.build_teacher(C.TeacherConfig(), size)
    student = models.build_student(C.StudentConfig(weights=args.student_weights), size)
    plan = [("teacher fp32", teacher, "fp32"), ("student fp32", student, "fp32"),
            ("student fp16", student, "fp16"), ("student int8", student, "int8"),
            ("student int8 mul", student, "int8")]  # hard-swish as MUL/ADD: one XNNPACK partition
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, mode in plan:
            path = Path(tmp) / f"{name.replace(' ', '_')}.tflite"
            path.write_bytes(quantize.convert(model, mode, calibration if mode == "int8" else None,
                                              hard_swish="mul" if name.endswith(" mul") else "fused"))
            timing = cost.tflite_latency(path, runs=args.runs, warmup=args.warmup, threads=1)
            results[name] = {"size_mb": path.stat().st_size / 1e6, **timing}
            results[name]["xnnpack_partitions"] = cost.delegate_partitions(path)
            print(f"{name:18s} {results[name]['size_mb']:8.2f} MB  median {timing['latency_ms_median']:8.2f} ms  "
                  f"p90 {timing['latency_ms_p90']:8.2f} ms  XNNPACK partitions "
                  f"{results[name]['xnnpack_partitions']}", flush=True)
    t = {k: v["latency_ms_median"] for k, v in results.items()}
    ratios = {"teacher_fp32_over_student_int8": t["teacher fp32"] / t["student int8"],
              "student_fp32_over_student_int8": t["student fp32"] / t["student int8"],
              "teacher_fp32_over_student_fp32": t["teacher fp32"] / t["student fp32"]}
    print(f"speed-up int8 student vs fp32 teacher: {ratios['teacher_fp32_over_student_int8']:.1f}x (target >= 30x)")
    print(f"speed-up int8 student vs fp32 student: {ratios['student_fp32_over_student_int8']:.2f}x (target >= 2x)")
    print(f"speed-up fp32 student vs fp32 teacher: {ratios['teacher_fp32_over_student_fp32']:.1f}x")
    print(f"speed-up int8 student with hard-swish as MUL vs fp32 student: "
          f"{t['student fp32'] / t['student int8 mul']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": size, "results": results, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
