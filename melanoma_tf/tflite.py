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
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from melanoma_tf.errors import MelanomaTfError


class FlatbufferError(MelanomaTfError, ValueError):
    """A .tflite file is cut short, corrupted or not a flatbuffer; the message names the file."""


def verify_flatbuffer(path: str | os.PathLike) -> bytes:
    """Checks a ``.tflite`` file's structure before any runtime opens it.

    The C++ runtimes trust the file: a copy cut short (an interrupted ``scp``)
    made them crash with a segmentation fault or eat all memory. Here every
    table, vector and buffer is read with bounds-checked Python code first: the
    ``TFL3`` identifier, the root table, each subgraph's tensors (shape, buffer
    index) and operators (opcode and tensor indices), and each buffer's data
    (inside the file, or at its external offset).

    Returns:
      The file's bytes (read once; callers hash them).

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
                _check_tensor(path, model, tensor, t, n_buffers, len(data))
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
    return data


# Bytes per element of each TFLite tensor type (schema TensorType); None: variable or packed (not size-checked).
_TYPE_BYTES = {0: 4, 1: 2, 2: 4, 3: 1, 4: 8, 5: None, 6: 1, 7: 2, 8: 8, 9: 1, 10: 8, 11: 16, 12: 8, 13: None,
               14: None, 15: 4, 16: 2, 17: None}
_MAX_TENSOR_BYTES = 1 << 30  # no tensor of an image classifier comes near 1 GiB; a corrupt shape does


def _check_tensor(path: Path, model, tensor, index: int, n_buffers: int, file_size: int) -> None:
    """One tensor's buffer index, type and shape, and a constant's data size, are consistent."""
    if not 0 <= tensor.Buffer() < max(n_buffers, 1):
        raise FlatbufferError(f"{path}: tensor {index} points at buffer {tensor.Buffer()} of {n_buffers}")
    if tensor.Type() not in _TYPE_BYTES:
        raise FlatbufferError(f"{path}: tensor {index} has unknown type {tensor.Type()}")
    shape = np.asarray(tensor.ShapeAsNumpy() if tensor.ShapeLength() else [], dtype=np.int64)
    if np.any(shape < -1):
        raise FlatbufferError(f"{path}: tensor {index} has a negative dimension {shape.tolist()}")
    quantization = tensor.Quantization()
    if quantization is not None and quantization.ScaleLength():
        scales = quantization.ScaleAsNumpy().astype(np.float64)
        if not np.all(np.isfinite(scales) & (scales >= 0) & (scales < 1e6)):
            raise FlatbufferError(f"{path}: tensor {index} has an impossible quantization scale "
                                  f"{scales[~(np.isfinite(scales) & (scales >= 0) & (scales < 1e6))][:3].tolist()}")
    itemsize = _TYPE_BYTES[tensor.Type()]
    elements = int(np.prod(np.maximum(shape, 1), dtype=np.float64)) if shape.size else 1
    if itemsize is None:
        return
    if elements * itemsize > _MAX_TENSOR_BYTES:
        raise FlatbufferError(f"{path}: tensor {index} of shape {shape.tolist()} would need "
                              f"{elements * itemsize:,} bytes")
    buffer = model.Buffers(tensor.Buffer()) if n_buffers else None
    if buffer is None:
        return
    stored = buffer.Size() if buffer.Offset() > 1 else buffer.DataLength()
    if stored and stored != elements * itemsize:
        raise FlatbufferError(f"{path}: constant tensor {index} of shape {shape.tolist()} holds {stored:,} bytes, "
                              f"not {elements * itemsize:,}")


# Opens a flatbuffer, allocates and runs it once on zeros, in a child process with a memory cap: what a
# corrupt-but-well-formed file does to the C++ runtime (abort, segfault, unbounded allocation) happens there.
_PROBE = """
import resource, sys
import numpy as np
cap = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
from ai_edge_litert.interpreter import Interpreter
interpreter = Interpreter(model_path=sys.argv[1], num_threads=1)
interpreter.allocate_tensors()
for detail in interpreter.get_input_details():
    interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
interpreter.invoke()
"""


def probe_in_child(path: str | os.PathLike, memory_bytes: int = 4 << 30, timeout: float = 120.0) -> None:
    """Runs the model once in a child process; raises FlatbufferError if that process dies or hangs."""
    import subprocess
    import sys

    path = Path(path)
    try:
        result = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(memory_bytes)], capture_output=True,
                                text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FlatbufferError(f"{path}: the TFLite runtime did not finish one inference in {timeout:.0f}s: "
                              "the file is corrupt") from None
    if result.returncode < 0 or result.returncode > 1:
        raise FlatbufferError(f"{path}: the TFLite runtime crashed on it (exit {result.returncode}): the file is "
                              "corrupt")
    if result.returncode == 1:
        last = (result.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise FlatbufferError(f"{path}: the TFLite runtime cannot run it: {last}")


def verify_model_file(path: str | os.PathLike, probe: bool = True) -> Optional[dict]:
    """Verifies a ``.tflite`` before it is opened: its structure, and its sidecar's size and sha256 if present.

    A file whose sidecar's sha256 vouches for it is what ``quantize`` wrote and
    checked; any other file is also run once in a child process first
    (:func:`probe_in_child`, about 0.2 s), since a well-formed flatbuffer can still
    hold values (a scale, a dropped quantization) that abort the C++ runtime.

    Returns:
      The sidecar (``X.json`` beside ``X.tflite``), or None.

    Raises:
      FlatbufferError: the file is broken, or it is not the file its sidecar describes.
    """
    import hashlib

    path = Path(path)
    blob = verify_flatbuffer(path)
    sidecar = read_sidecar(path)
    if sidecar:
        size, digest = sidecar.get("size_bytes"), sidecar.get("sha256")
        if size is not None and int(size) != len(blob):
            raise FlatbufferError(f"{path}: {len(blob):,} bytes, its sidecar {path.with_suffix('.json').name} says "
                                  f"{int(size):,}: a partial copy, or the sidecar of another model")
        if digest and hashlib.sha256(blob).hexdigest() != digest:
            raise FlatbufferError(f"{path}: sha256 differs from its sidecar {path.with_suffix('.json').name}: "
                                  "the file was changed, or the sidecar belongs to another model")
    if probe and not (sidecar and sidecar.get("sha256")):
        probe_in_child(path)
    return sidecar


# Builtin operator codes (TFLite schema BuiltinOperator) whose weights and multiply-adds are counted.
_CONV_2D, _DEPTHWISE_CONV_2D, _FULLY_CONNECTED = 3, 4, 9


def flatbuffer_counts(path: str | os.PathLike) -> dict:
    """Parameters and multiply-adds per image of a ``.tflite``, read from its flatbuffer.

    Counted as :func:`melanoma_tf.cost.count_macs` counts a Keras model: every
    CONV_2D (H_out * W_out * k_h * k_w * C_in * C_out), DEPTHWISE_CONV_2D
    (H_out * W_out * k_h * k_w * C_out) and FULLY_CONNECTED (inputs * units)
    op. Parameters are the elements of those ops' weight and bias tensors
    (BatchNorm is folded into them, so a Keras model with N BatchNorm channels
    counts 3 N more: gamma, moving mean and variance).

    Returns:
      ``{"params": ..., "flops": ...}`` (``flops``: multiply-adds, as in the reports).
    """
    from ai_edge_litert import schema_py_generated as schema

    data = Path(path).read_bytes()
    model = schema.Model.GetRootAs(data, 0)
    graph = model.Subgraphs(0)

    def shape(index: int) -> list[int]:
        tensor = graph.Tensors(index)
        return [int(d) for d in tensor.ShapeAsNumpy()] if tensor.ShapeLength() else []

    params = macs = 0
    for o in range(graph.OperatorsLength()):
        op = graph.Operators(o)
        code = model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin not in (_CONV_2D, _DEPTHWISE_CONV_2D, _FULLY_CONNECTED):
            continue
        inputs = [int(i) for i in op.InputsAsNumpy()]
        weights, out = shape(inputs[1]), shape(int(op.OutputsAsNumpy()[0]))
        params += int(np.prod(weights)) + (int(np.prod(shape(inputs[2]))) if len(inputs) > 2 and inputs[2] >= 0
                                           else 0)
        if builtin == _CONV_2D:  # weights [C_out, k_h, k_w, C_in]
            macs += int(np.prod(out[1:3])) * int(np.prod(weights))
        elif builtin == _DEPTHWISE_CONV_2D:  # weights [1, k_h, k_w, C_out]
            macs += int(np.prod(out[1:3])) * int(np.prod(weights))
        else:  # weights [units, inputs]; one position per row of the output
            macs += int(np.prod(out[1:-1] or [1])) * int(np.prod(weights))
    return {"params": int(params), "flops": int(macs)}


def make_interpreter(path: str, threads: int = 1, reference_kernels: bool = False):
    """A LiteRT interpreter (ai-edge-litert).

    ``reference_kernels`` selects TFLite's reference kernels, the arithmetic
    TFLite-Micro implements: measured on the HAM10000 int8 student, they match
    TFLM bit for bit, while the default XNNPACK int8 path differs by up to 6 steps.
    """
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
        verify_model_file(self.path)
        self.interpreter = make_interpreter(str(self.path), threads, reference_kernels)
        self.interpreter.allocate_tensors()
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        shape = tuple(inputs[0]["shape"]) if inputs else ()
        if len(inputs) != 1 or len(shape) != 4 or shape[-1] != 3 or len(outputs) != 1:
            raise FlatbufferError(f"{self.path}: expected one image input (1, H, W, 3) and one output, got inputs "
                                  f"{[tuple(i['shape']) for i in inputs]} and {len(outputs)} output(s)")
        self._input, self._output = inputs[0], outputs[0]
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
        sidecar = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FlatbufferError(f"{path}: invalid sidecar JSON: {err}") from None
    if not isinstance(sidecar, dict):
        raise FlatbufferError(f"{path}: the sidecar must be a JSON object, got {type(sidecar).__name__}")
    return sidecar
