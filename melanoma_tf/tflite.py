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


class FlatbufferError(ValueError):
    """A .tflite file is cut short, corrupted or not a flatbuffer; the message names the file."""


def verify_flatbuffer(path: str | os.PathLike) -> None:
    """Checks a ``.tflite`` file's structure before any runtime opens it.

    The C++ runtimes trust the file: a copy cut short (an interrupted ``scp``)
    made them crash with a segmentation fault or eat all memory. Here every
    table, vector and buffer is read with bounds-checked Python code first: the
    ``TFL3`` identifier, the root table, each subgraph's tensors (shape, buffer
    index) and operators (opcode and tensor indices), and each buffer's data
    (inside the file, or at its external offset).

    Raises:
      FlatbufferError: with the file name and what is wrong.
    """
    from ai_edge_litert import schema_py_generated as schema

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TFLite model not found: {path}")
    data = path.read_bytes()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise FlatbufferError(f"{path}: not a TFLite flatbuffer (no 'TFL3' identifier)")
    try:
        model = schema.Model.GetRootAs(data, 0)
        n_buffers, n_codes = model.BuffersLength(), model.OperatorCodesLength()
        for i in range(n_codes):
            model.OperatorCodes(i).BuiltinCode()
        if model.SubgraphsLength() < 1:
            raise FlatbufferError(f"{path}: the model has no subgraph")
        for g in range(model.SubgraphsLength()):
            graph = model.Subgraphs(g)
            n_tensors = graph.TensorsLength()
            for t in range(n_tensors):
                tensor = graph.Tensors(t)
                tensor.ShapeAsNumpy()
                if not 0 <= tensor.Buffer() < max(n_buffers, 1):
                    raise FlatbufferError(f"{path}: tensor {t} points at buffer {tensor.Buffer()} of {n_buffers}")
            for io in (graph.InputsAsNumpy(), graph.OutputsAsNumpy()):
                if np.any((np.asarray(io) < 0) | (np.asarray(io) >= n_tensors)):
                    raise FlatbufferError(f"{path}: subgraph {g} names a tensor it does not have")
            for o in range(graph.OperatorsLength()):
                op = graph.Operators(o)
                if not 0 <= op.OpcodeIndex() < n_codes:
                    raise FlatbufferError(f"{path}: operator {o} has opcode {op.OpcodeIndex()} of {n_codes}")
                for io in (op.InputsAsNumpy(), op.OutputsAsNumpy()):
                    io = np.asarray(io)
                    if np.any((io < -1) | (io >= n_tensors)):
                        raise FlatbufferError(f"{path}: operator {o} names a tensor it does not have")
        for b in range(n_buffers):
            buffer = model.Buffers(b)
            if buffer.Offset() > 1:  # stored after the flatbuffer (models over 2 GB)
                if buffer.Offset() + buffer.Size() > len(data):
                    raise FlatbufferError(f"{path}: buffer {b} ends at byte {buffer.Offset() + buffer.Size()} "
                                          f"of {len(data)}: the file is cut short")
            elif buffer.DataLength():
                buffer.DataAsNumpy()
    except FlatbufferError:
        raise
    except Exception as err:  # noqa: BLE001 - any read past the end or bad offset means a broken file
        raise FlatbufferError(f"{path}: corrupt or cut-short TFLite flatbuffer ({len(data):,} bytes): "
                              f"{type(err).__name__}: {err}") from None


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
        verify_flatbuffer(self.path)
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
