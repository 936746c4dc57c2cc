"""What a model costs: parameters, multiply-adds per image, size on disk and latency.

:func:`model_cost` is the one function every report uses.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from melanoma_tf.backend import keras, tf
from melanoma_tf.models import load_model
from melanoma_tf.tflite import TFLiteModel, flatbuffer_counts


def count_params(model: keras.Model) -> int:
    """All weights, trainable or not (BatchNorm statistics included), as Keras counts them."""
    return int(model.count_params())


def _spatial(shape) -> int:
    return int(np.prod([d for d in shape[1:-1]]))


def count_macs(model: keras.Model) -> int:
    """Multiply-accumulates per image of the convolutions and dense layers, walked layer by layer.

    Conv2D: H_out * W_out * k_h * k_w * C_in / groups * C_out; DepthwiseConv2D:
    H_out * W_out * k_h * k_w * C_in * depth_multiplier; Dense: inputs * units per
    position. Element-wise work (activations, BatchNorm, pooling, squeeze-excite
    scaling) is not counted: it is small next to these and not a multiply-add
    of weights. Nested models are walked too.
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += count_macs(layer)
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw = layer.kernel_size
            c_in = layer.input_shape[-1]
            total += _spatial(layer.output_shape) * kh * kw * c_in * layer.depth_multiplier
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            c_in = layer.input_shape[-1]
            total += _spatial(layer.output_shape) * kh * kw * (c_in // layer.groups) * layer.filters
        elif isinstance(layer, keras.layers.Dense):
            in_shape = layer.input_shape
            positions = int(np.prod(in_shape[1:-1])) if len(in_shape) > 2 else 1
            total += positions * in_shape[-1] * layer.units
    return int(total)


def size_mb(path: str | os.PathLike) -> float:
    """File size in MB (10^6 bytes)."""
    return os.path.getsize(path) / 1e6


def _summarise(times_ms: list[float]) -> dict:
    arr = np.asarray(times_ms)
    return {"latency_ms_median": float(np.median(arr)), "latency_ms_p90": float(np.percentile(arr, 90)),
            "latency_ms_min": float(arr.min()), "latency_runs": int(len(arr))}


def keras_latency(model: keras.Model, runs: int = 50, warmup: int = 5) -> dict:
    """Batch-1 latency of a compiled forward pass (median and p90 over ``runs`` after ``warmup``).

    Threads are whatever the process was configured with; the evaluate command
    sets one intra-op and one inter-op thread before TensorFlow starts.
    """
    shape = (1, *model.input_shape[1:])
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32))
    forward = tf.function(lambda inputs: model(inputs, training=False))
    for _ in range(warmup):
        forward(x).numpy()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        forward(x).numpy()
        times.append((time.perf_counter() - start) * 1e3)
    return _summarise(times)


def tflite_latency(path: str | os.PathLike, runs: int = 50, warmup: int = 5, threads: int = 1) -> dict:
    """Batch-1 latency of a TFLite flatbuffer with ``threads`` interpreter threads."""
    model = TFLiteModel(path, threads=threads)
    x = np.random.default_rng(0).uniform(0, 255, (1, *model.input_shape[1:])).astype(np.float32)
    for _ in range(warmup):
        model.run_raw(model.quantize_input(x))
    times = []
    raw = model.quantize_input(x)
    for _ in range(runs):
        start = time.perf_counter()
        model.run_raw(raw)
        times.append((time.perf_counter() - start) * 1e3)
    return _summarise(times)


def delegate_partitions(path: str | os.PathLike) -> int:
    """How many XNNPACK partitions the runtime cuts a flatbuffer into (1: the whole graph is delegated).

    Every op XNNPACK cannot take (int8 HARD_SWISH, for one) runs on TFLite's own kernels between
    two partitions; each boundary costs a hand-over, so the count explains int8 latency on CPUs.
    """
    model = TFLiteModel(path, threads=1)
    # Private API, the only one that lists the execution plan after delegation (no public equivalent).
    return sum(op["op_name"] == "DELEGATE" for op in model.interpreter._get_ops_details())


def model_cost(model_path: str | os.PathLike, keras_model: Optional[keras.Model] = None, runs: int = 50,
               warmup: int = 5, reference_keras: Optional[keras.Model] = None) -> dict:
    """Params, MACs ("flops", multiply-adds per image), size and batch-1 latency of a model file.

    Args:
      model_path: a ``.keras`` or ``.tflite`` file.
      keras_model: the loaded Keras model (loaded from model_path if None and it is ``.keras``).
      runs, warmup: timed and untimed forward passes.
      reference_keras: for a ``.tflite``, the Keras model it came from, to report
        its params and MACs (a flatbuffer has the same arithmetic).
    """
    path = Path(model_path)
    result = {"model_file": str(path), "size_mb": size_mb(path)}
    if path.suffix == ".tflite":
        result.update(tflite_latency(path, runs, warmup))
        result["runtime"] = "tflite"
        result["threads"] = 1
        source = reference_keras
    else:
        if keras_model is None:
            keras_model = load_model(path)
        result.update(keras_latency(keras_model, runs, warmup))
        result["runtime"] = "keras"
        result["threads"] = int(tf.config.threading.get_intra_op_parallelism_threads())  # 0: all cores
        source = keras_model
    if source is not None:
        result["params"] = count_params(source)
        result["flops"] = count_macs(source)
        result["input_size"] = int(source.input_shape[1])
    elif path.suffix == ".tflite":  # no Keras model at hand: count from the flatbuffer itself
        result.update(flatbuffer_counts(path))
    return result
