"""Running TFLite flatbuffers of any quantization from float images in [0, 255].

Quantized inputs are filled with ``round(x / scale + zero_point)``; quantized
outputs are turned back into logits with ``(q - zero_point) * scale``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np


def make_interpreter(path: str, threads: int = 1, reference_kernels: bool = False):
    """A LiteRT interpreter (ai-edge-litert), falling back to TensorFlow's.

    ``reference_kernels`` selects TFLite's reference kernels, the arithmetic
    TFLite-Micro implements: measured on the HAM10000 int8 student, they match
    TFLM bit for bit, while the default XNNPACK int8 path differs by up to 6 steps.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:  # pragma: no cover - depends on the installed extras
        from melanoma_tf.backend import tf

        Interpreter, OpResolverType = tf.lite.Interpreter, tf.lite.experimental.OpResolverType
    resolver = OpResolverType.BUILTIN_REF if reference_kernels else OpResolverType.AUTO
    return Interpreter(model_path=path, num_threads=threads, experimental_op_resolver_type=resolver)


class TFLiteModel:
    """A flatbuffer with one image input and one logit output.

    Args:
      path: the ``.tflite`` file.
      threads: interpreter threads.
      reference_kernels: use TFLite's reference kernels (TFLite-Micro's arithmetic).
    """

    def __init__(self, path: str | os.PathLike, threads: int = 1, reference_kernels: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"TFLite model not found: {self.path}")
        self.threads = threads
        self.interpreter = make_interpreter(str(self.path), threads, reference_kernels)
        self.interpreter.allocate_tensors()
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self._batch = 1

    @property
    def input_shape(self) -> tuple:
        return tuple(int(d) for d in self._input["shape"])

    @property
    def input_dtype(self):
        return self._input["dtype"]

    @property
    def output_dtype(self):
        return self._output["dtype"]

    def quantize_input(self, images: np.ndarray) -> np.ndarray:
        dtype = self._input["dtype"]
        if dtype in (np.float32, np.float16):
            return images.astype(dtype)
        scale, zero = self._input["quantization"]
        info = np.iinfo(dtype)
        q = np.round(images / scale + zero)
        return np.clip(q, info.min, info.max).astype(dtype)

    def dequantize_output(self, raw: np.ndarray) -> np.ndarray:
        if self._output["dtype"] in (np.float32, np.float16):
            return raw.astype(np.float32)
        scale, zero = self._output["quantization"]
        return ((raw.astype(np.float32) - zero) * scale).astype(np.float32)

    def _resize(self, batch: int) -> None:
        if batch != self._batch:
            self.interpreter.resize_tensor_input(self._input["index"], [batch, *self.input_shape[1:]])
            self.interpreter.allocate_tensors()
            self._input = self.interpreter.get_input_details()[0]
            self._output = self.interpreter.get_output_details()[0]
            self._batch = batch

    def run_raw(self, raw: np.ndarray) -> np.ndarray:
        """One invocation on already-quantized input; returns the raw output tensor."""
        self._resize(raw.shape[0])
        self.interpreter.set_tensor(self._input["index"], raw)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self._output["index"]).copy()

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Logits for float images in [0, 255] of the model's input size."""
        outputs = []
        for start in range(0, len(images), batch_size):
            chunk = np.asarray(images[start:start + batch_size], dtype=np.float32)
            outputs.append(self.dequantize_output(self.run_raw(self.quantize_input(chunk))))
        return np.concatenate(outputs) if outputs else np.zeros((0, 1), np.float32)


def read_sidecar(model_path: str | os.PathLike) -> Optional[dict]:
    """The JSON written beside a flatbuffer (``X.tflite`` -> ``X.json``), if any."""
    path = Path(model_path).with_suffix(".json")
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid sidecar JSON: {err}") from None
