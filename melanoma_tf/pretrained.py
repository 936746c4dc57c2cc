"""ImageNet weights from files as they are published, and BatchNorm re-estimation.

Two formats that cannot be read by ``keras.applications`` are imported here:

- a **TFLite flatbuffer** of MobileNetV3-Small (Google's uint8 release
  ``v3-small_224_1.0_uint8.tflite``): its CONV_2D / DEPTHWISE_CONV_2D ops map one
  to one, in graph order, onto the Keras model's convolutions. BatchNorm is folded
  into them, so every Keras BatchNorm becomes the identity plus the folded bias;
  :func:`reestimate_batchnorm` then gives those layers real statistics (without it
  fine-tuning on HAM10000 collapsed to ROC-AUC 0.26-0.61 here).
- a folder of **TF-slim tensors as .npy files** (MobileNetV2 1.0,
  ``Conv_weights.npy``, ``expanded_conv_3_expand_BatchNorm_gamma.npy``, ...).

Both are converted on every use: reading a 2.6 MB flatbuffer or 261 small files
takes well under a second, so a cache would only add a way to go stale.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from melanoma_tf.backend import keras, tf
from melanoma_tf.config import ConfigError
from melanoma_tf.tflite import FlatbufferError, verify_flatbuffer

log = logging.getLogger("melanoma_tf.pretrained")

_CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")


class WeightsError(ConfigError):
    """A weights file is missing, unreadable, or does not fit the model; the message names the file."""


def describe_weights(path: str | os.PathLike) -> dict:
    """What a run records about a weights file or folder: its name, kind and sha256 (no machine path)."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for member in sorted(path.glob("*.npy")):
            digest.update(member.name.encode())
            digest.update(member.read_bytes())
        kind = "npy folder"
    else:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        kind = path.suffix.lstrip(".") or "file"
    return {"name": path.name, "kind": kind, "sha256": digest.hexdigest()}


# --------------------------------------------------------------------------- TFLite (MobileNetV3-Small)


def _open_tflite(path: Path):
    """A LiteRT interpreter on ``path``, after the checks that keep a bad file from crashing it."""
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        verify_flatbuffer(path)
    except FlatbufferError as err:
        raise WeightsError(str(err)) from None

    try:
        return Interpreter(model_path=str(path))
    except (ValueError, RuntimeError) as err:
        raise WeightsError(f"{path}: the TFLite runtime cannot read it: {err}") from None


def _dequantize(interpreter, detail: dict) -> np.ndarray:
    """The float value of a constant tensor (per-tensor or per-axis affine quantization)."""
    value = interpreter.get_tensor(detail["index"])
    params = detail.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", []), dtype=np.float64)
    if value.dtype in (np.float32, np.float16) or scales.size == 0:
        return value.astype(np.float32)
    zero_points = np.asarray(params.get("zero_points", np.zeros_like(scales)), dtype=np.float64)
    if scales.size > 1:  # per-axis: broadcast along the quantized dimension
        shape = [1] * value.ndim
        shape[params.get("quantized_dimension", 0)] = scales.size
        scales, zero_points = scales.reshape(shape), zero_points.reshape(shape)
    return ((value.astype(np.float64) - zero_points) * scales).astype(np.float32)


def read_tflite_convolutions(path: str | os.PathLike) -> list[dict]:
    """The convolutions of a TFLite model in execution order, dequantized.

    Returns:
      One dict per CONV_2D / DEPTHWISE_CONV_2D op: ``op``, ``kernel`` in Keras layout
      (``[h, w, in, out]``, or ``[h, w, in, multiplier]`` for depthwise) and ``bias``.
    """
    path = Path(path)
    interpreter = _open_tflite(path)
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    convs = []
    for op in interpreter._get_ops_details():  # noqa: SLF001 - the only API that lists ops in execution order
        if op["op_name"] not in _CONV_OPS:
            continue
        weight_index, bias_index = op["inputs"][1], op["inputs"][2] if len(op["inputs"]) > 2 else -1
        kernel = _dequantize(interpreter, details[weight_index])
        if op["op_name"] == "CONV_2D":  # TFLite [out, h, w, in] -> Keras [h, w, in, out]
            kernel = kernel.transpose(1, 2, 3, 0)
        else:  # TFLite [1, h, w, in * multiplier] -> Keras [h, w, in, multiplier] (multiplier 1 here)
            kernel = kernel[0][..., np.newaxis]
        bias = (_dequantize(interpreter, details[bias_index]) if bias_index >= 0
                else np.zeros(kernel.shape[-1] if op["op_name"] == "CONV_2D" else kernel.shape[-2], np.float32))
        convs.append({"op": op["op_name"], "kernel": kernel, "bias": bias})
    if not convs:
        raise WeightsError(f"{path}: the flatbuffer has no CONV_2D or DEPTHWISE_CONV_2D op to import")
    return convs


def keras_convolutions(model: keras.Model) -> list:
    """The Conv2D / DepthwiseConv2D layers of a (possibly nested) model, in graph order."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found += keras_convolutions(layer)
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            found.append(layer)
    return found


def _batchnorm_after(model: keras.Model, conv) -> Optional[keras.layers.BatchNormalization]:
    """The BatchNormalization that directly consumes ``conv``'s output, if any."""
    for node in conv._outbound_nodes:  # noqa: SLF001 - Keras 2 exposes the graph only this way
        if isinstance(node.outbound_layer, keras.layers.BatchNormalization):
            return node.outbound_layer
    return None


def load_tflite_weights(model: keras.Model, path: str | os.PathLike) -> int:
    """Copies a TFLite model's (BatchNorm-folded) convolution weights into ``model``.

    The flatbuffer's convolutions are matched to the Keras model's in graph order.
    The Keras model may stop earlier (a backbone without the classifier): the
    flatbuffer's remaining convolutions are then ignored. A Keras convolution
    followed by BatchNorm gets the folded kernel, and the BatchNorm becomes the
    identity plus the folded bias (``gamma 1, beta bias, mean 0, var 1 - eps``);
    call :func:`reestimate_batchnorm` before training.

    Args:
      model: a Keras model of the same architecture (e.g. MobileNetV3-Small 1.0).
      path: the ``.tflite`` file.

    Returns:
      How many convolutions were loaded.

    Raises:
      WeightsError: not a flatbuffer, or its convolutions do not fit the model
        (another width, kernel size or architecture); the message names the layer.
    """
    path = Path(path)
    source = read_tflite_convolutions(path)
    targets = keras_convolutions(model)
    if len(targets) > len(source):
        raise WeightsError(f"{path}: has {len(source)} convolutions, the model {model.name} needs {len(targets)}: "
                           "another architecture")
    for position, (layer, conv) in enumerate(zip(targets, source)):
        depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        kernel_var = layer.depthwise_kernel if depthwise else layer.kernel
        if depthwise != (conv["op"] == "DEPTHWISE_CONV_2D") or tuple(kernel_var.shape) != conv["kernel"].shape:
            raise WeightsError(
                f"{path}: convolution {position} ({conv['op']}, kernel {conv['kernel'].shape}) does not fit layer "
                f"{layer.name!r} ({type(layer).__name__}, kernel {tuple(kernel_var.shape)}): the file is for "
                "another architecture or width (this file fits MobileNetV3-Small alpha 1.0, not minimalistic)")
        batchnorm = _batchnorm_after(model, layer)
        if layer.use_bias:
            layer.set_weights([conv["kernel"], conv["bias"]])
        else:
            layer.set_weights([conv["kernel"]])
            if batchnorm is None:
                raise WeightsError(f"{path}: layer {layer.name!r} has neither a bias nor a BatchNorm to take the "
                                   "folded bias")
        if batchnorm is not None:
            if layer.use_bias:  # the bias went into the conv; the BatchNorm adds nothing
                conv = {**conv, "bias": np.zeros_like(conv["bias"])}
            eps = batchnorm.epsilon
            ones = np.ones_like(conv["bias"])
            batchnorm.set_weights([ones, conv["bias"], np.zeros_like(ones), ones * (1.0 - eps)])
    log.info("loaded %d convolutions from %s into %s (%d in the file)", len(targets), path.name, model.name,
             len(source))
    return len(targets)


# --------------------------------------------------------------------------- TF-slim .npy (MobileNetV2)


def _slim_mobilenet_v2_name(keras_name: str) -> Optional[str]:
    """The TF-slim tensor prefix of a Keras MobileNetV2 layer (None for layers without weights)."""
    names = {"Conv1": "Conv", "bn_Conv1": "Conv_BatchNorm", "Conv_1": "Conv_1", "Conv_1_bn": "Conv_1_BatchNorm"}
    if keras_name in names:
        return names[keras_name]
    if keras_name.startswith("expanded_conv_"):  # block 0: expanded_conv_depthwise, expanded_conv_project(_BN)
        prefix, rest = "expanded_conv", keras_name[len("expanded_conv_"):]
    elif keras_name.startswith("block_"):
        number, _, rest = keras_name[len("block_"):].partition("_")
        prefix = f"expanded_conv_{number}"
    else:
        return None
    part, _, bn = rest.partition("_")
    if part not in ("expand", "depthwise", "project"):
        return None
    if bn == "BN":
        return f"{prefix}_{part}_BatchNorm"
    return f"{prefix}_{part}_depthwise" if part == "depthwise" else f"{prefix}_{part}"


def load_slim_npy_weights(model: keras.Model, folder: str | os.PathLike) -> int:
    """Loads a TF-slim MobileNetV2 exported as one ``.npy`` per tensor into a Keras MobileNetV2 (no top).

    Returns:
      How many layers were loaded.

    Raises:
      WeightsError: a tensor is missing or has another shape; the message names it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a folder of .npy tensors")

    def tensor(name: str, shape: tuple) -> np.ndarray:
        file = folder / f"{name}.npy"
        if not file.is_file():
            raise WeightsError(f"{folder}: tensor {file.name} is missing (the folder is not a TF-slim MobileNetV2)")
        try:
            value = np.load(file, allow_pickle=False)
        except ValueError as err:
            raise WeightsError(f"{file}: not a .npy array: {err}") from None
        if tuple(value.shape) != tuple(shape):
            raise WeightsError(f"{file}: shape {value.shape}, the model's layer needs {tuple(shape)}: another "
                               "width or architecture (this folder fits MobileNetV2 alpha 1.0)")
        return value.astype(np.float32)

    loaded = 0
    for layer in model.layers:
        slim = _slim_mobilenet_v2_name(layer.name)
        if slim is None or not layer.weights:
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = tuple(layer.gamma.shape)
            layer.set_weights([tensor(f"{slim}_{k}", shape) for k in ("gamma", "beta", "moving_mean",
                                                                       "moving_variance")])
        else:
            layer.set_weights([tensor(f"{slim}_weights", tuple(w.shape)) for w in layer.weights])
        loaded += 1
    if not loaded:
        raise WeightsError(f"{folder}: the model {model.name} has no MobileNetV2 layer to load into")
    log.info("loaded %d layers from %s into %s", loaded, folder.name, model.name)
    return loaded


# --------------------------------------------------------------------------- BatchNorm re-estimation


def reestimate_batchnorm(model: keras.Model, images: Iterable[np.ndarray] | np.ndarray,
                         batch_size: int = 32) -> int:
    """Re-estimates every BatchNorm's moving statistics on ``images``, keeping the function unchanged.

    Each BatchNorm gets the mean and variance of its input over the images, and its
    gamma and beta are adjusted so that its inference output stays the same. After
    an import with folded BatchNorm this gives ``gamma = sqrt(var + eps)``,
    ``beta = bias + mean``: training-mode batches (batch statistics) then behave
    like inference, which a fine-tune needs to start where the imported model is.

    Args:
      model: the model (nested models included).
      images: float images as the model takes them, e.g. ~256 training images.
      batch_size: images per forward pass.

    Returns:
      How many BatchNorm layers were updated.
    """
    layers = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    if not layers:
        return 0
    probe = keras.Model(model.inputs, [layer.input for layer in layers])
    images = np.asarray(images, dtype=np.float32)
    if len(images) == 0:
        raise ValueError("reestimate_batchnorm: no images")
    sums = [0.0] * len(layers)
    squares = [0.0] * len(layers)
    count = [0] * len(layers)
    for start in range(0, len(images), batch_size):
        outputs = probe(images[start:start + batch_size], training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        for i, value in enumerate(outputs):
            value = tf.reshape(tf.cast(value, tf.float64), (-1, value.shape[-1]))
            sums[i] += tf.reduce_sum(value, axis=0).numpy()
            squares[i] += tf.reduce_sum(tf.square(value), axis=0).numpy()
            count[i] += int(value.shape[0])
    for i, layer in enumerate(layers):
        mean = sums[i] / count[i]
        var = np.maximum(squares[i] / count[i] - mean ** 2, 0.0)
        gamma, beta, old_mean, old_var = [w.astype(np.float64) for w in layer.get_weights()]
        eps = layer.epsilon
        scale = gamma / np.sqrt(old_var + eps)
        new_gamma = scale * np.sqrt(var + eps)
        new_beta = beta + scale * (mean - old_mean)
        layer.set_weights([w.astype(np.float32) for w in (new_gamma, new_beta, mean, var)])
    return len(layers)


def _all_layers(model: keras.Model) -> list:
    found = []
    for layer in model.layers:
        found += _all_layers(layer) if isinstance(layer, keras.Model) else [layer]
    return found
