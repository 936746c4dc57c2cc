"""MobileNetV3-Small, layer for layer as ``keras.applications.MobileNetV3Small``, but quantizable.

Keras builds hard-swish and hard-sigmoid from ``TFOpLambda`` layers
(``x + 3.0``, ``* (1 / 6)``), which TF-MOT's ``quantize_model`` cannot wrap. Here
they are proper layers (:class:`HardSwish`, :class:`HardSigmoid`) with the same
arithmetic, and every layer keeps the Keras name, so ImageNet weights load by
name and the float outputs are identical (tested). :mod:`melanoma_tf.quantize`
gives these layers, ``Multiply`` and ``Rescaling`` their QuantizeConfigs, so the
whole student converts to an int8-only flatbuffer.
"""

from __future__ import annotations

import contextlib
from typing import Optional

from melanoma_tf.backend import keras, tf

layers = keras.layers


@keras.utils.register_keras_serializable(package="melanoma_tf")
class HardSigmoid(layers.Layer):
    """relu6(x + 3) / 6, as in MobileNetV3."""

    def call(self, inputs):
        return tf.nn.relu6(inputs + 3.0) * (1.0 / 6.0)


# How HardSwish is written when a model is traced for TFLite (see hard_swish_form).
HARD_SWISH_FORMS = ("fused", "mul")
_hard_swish_form = "fused"


@contextlib.contextmanager
def hard_swish_form(form: str):
    """Traces HardSwish as ``form`` inside the block (the float arithmetic is the same).

    ``fused``: ``x * relu6(x + 3) / 6``, which the TFLite converter turns into one
    HARD_SWISH op: exact int8 kernel, the smallest TFLite-Micro arena, but XNNPACK has
    no int8 HARD_SWISH, so on CPUs each one cuts the int8 graph into another delegate
    partition run between TFLite's own kernels (19 partitions for the student).
    ``mul``: ``(x / 6) * relu6(x + 3)``, which the converter leaves as MUL and ADD
    (with a fused ReLU6): the whole int8 graph is one XNNPACK partition, at the cost of
    two more int8 roundings per activation and larger TFLite-Micro arenas.
    """
    global _hard_swish_form
    if form not in HARD_SWISH_FORMS:
        raise ValueError(f"hard-swish form {form!r}: choose from {HARD_SWISH_FORMS}")
    previous, _hard_swish_form = _hard_swish_form, form
    try:
        yield
    finally:
        _hard_swish_form = previous


@keras.utils.register_keras_serializable(package="melanoma_tf")
class HardSwish(layers.Layer):
    """x * relu6(x + 3) / 6; TFLite fuses it into one HARD_SWISH op (unless traced as ``mul``)."""

    def call(self, inputs):
        if _hard_swish_form == "mul":
            return (inputs * (1.0 / 6.0)) * tf.nn.relu6(inputs + 3.0)
        return inputs * tf.nn.relu6(inputs + 3.0) * (1.0 / 6.0)


def _depth(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:  # never round down by more than 10%
        new_v += divisor
    return new_v


def _correct_pad(size: int, kernel: int) -> tuple:
    adjust = (1 - size % 2, 1 - size % 2) if size else (1, 1)
    correct = (kernel // 2, kernel // 2)
    return ((correct[0] - adjust[0], correct[0]), (correct[1] - adjust[1], correct[1]))


class _Namer:
    """Stable names for the weightless activation layers (Keras auto-numbers them per session)."""

    def __init__(self):
        self.count = {}

    def __call__(self, kind: str) -> str:
        n = self.count.get(kind, 0)
        self.count[kind] = n + 1
        return f"{kind}_{n}" if n else kind


def mobilenet_v3_small(image: keras.KerasTensor, alpha: float = 1.0, minimalistic: bool = False,
                       bn_momentum: float = 0.999, include_preprocessing: bool = True) -> keras.KerasTensor:
    """Builds the MobileNetV3-Small feature extractor on ``image`` (float RGB in [0, 255]).

    Args:
      image: the input tensor (a Keras Input).
      alpha: width multiplier.
      minimalistic: 3x3 kernels, ReLU, no squeeze-excite.
      bn_momentum: BatchNormalization momentum (Keras uses 0.999).
      include_preprocessing: scale [0, 255] to [-1, 1] inside the model.

    Returns:
      The last feature map (``Conv_1`` after its activation), as Keras's ``include_top=False``.
    """
    name = _Namer()

    def relu(x):
        return layers.ReLU(name=name("re_lu"))(x)

    def hard_swish(x):
        return HardSwish(name=name("hard_swish"))(x)

    def bn(x, layer_name):
        return layers.BatchNormalization(epsilon=1e-3, momentum=bn_momentum, name=layer_name)(x)

    kernel, activation, se_ratio = (3, relu, None) if minimalistic else (5, hard_swish, 0.25)

    def se_block(inputs, filters, prefix):
        x = layers.GlobalAveragePooling2D(keepdims=True, name=prefix + "squeeze_excite/AvgPool")(inputs)
        x = layers.Conv2D(_depth(filters * se_ratio), 1, padding="same", name=prefix + "squeeze_excite/Conv")(x)
        x = layers.ReLU(name=prefix + "squeeze_excite/Relu")(x)
        x = layers.Conv2D(filters, 1, padding="same", name=prefix + "squeeze_excite/Conv_1")(x)
        x = HardSigmoid(name=prefix + "squeeze_excite/HardSigmoid")(x)
        return layers.Multiply(name=prefix + "squeeze_excite/Mul")([inputs, x])

    def block(x, expansion, filters, k, stride, se, act, block_id):
        shortcut = x
        prefix = "expanded_conv/"
        infilters = x.shape[-1]
        if block_id:
            prefix = f"expanded_conv_{block_id}/"
            x = layers.Conv2D(_depth(infilters * expansion), 1, padding="same", use_bias=False,
                              name=prefix + "expand")(x)
            x = act(bn(x, prefix + "expand/BatchNorm"))
        if stride == 2:
            x = layers.ZeroPadding2D(_correct_pad(x.shape[1], k), name=prefix + "depthwise/pad")(x)
        x = layers.DepthwiseConv2D(k, strides=stride, padding="same" if stride == 1 else "valid", use_bias=False,
                                   name=prefix + "depthwise")(x)
        x = act(bn(x, prefix + "depthwise/BatchNorm"))
        if se:
            x = se_block(x, _depth(infilters * expansion), prefix)
        x = layers.Conv2D(filters, 1, padding="same", use_bias=False, name=prefix + "project")(x)
        x = bn(x, prefix + "project/BatchNorm")
        if stride == 1 and infilters == filters:
            x = layers.Add(name=prefix + "Add")([shortcut, x])
        return x

    def depth(d):
        return _depth(d * alpha)

    x = image
    if include_preprocessing:
        x = layers.Rescaling(scale=1.0 / 127.5, offset=-1.0, name="rescaling")(x)
    x = layers.Conv2D(16, 3, strides=(2, 2), padding="same", use_bias=False, name="Conv")(x)
    x = activation(bn(x, "Conv/BatchNorm"))
    for args in ((1, depth(16), 3, 2, se_ratio, relu, 0), (72.0 / 16, depth(24), 3, 2, None, relu, 1),
                 (88.0 / 24, depth(24), 3, 1, None, relu, 2), (4, depth(40), kernel, 2, se_ratio, activation, 3),
                 (6, depth(40), kernel, 1, se_ratio, activation, 4), (6, depth(40), kernel, 1, se_ratio, activation, 5),
                 (3, depth(48), kernel, 1, se_ratio, activation, 6), (3, depth(48), kernel, 1, se_ratio, activation, 7),
                 (6, depth(96), kernel, 2, se_ratio, activation, 8), (6, depth(96), kernel, 1, se_ratio, activation, 9),
                 (6, depth(96), kernel, 1, se_ratio, activation, 10)):
        x = block(x, *args)
    x = layers.Conv2D(_depth(x.shape[-1] * 6), 1, padding="same", use_bias=False, name="Conv_1")(x)
    return activation(bn(x, "Conv_1/BatchNorm"))


def load_backbone_weights(model: keras.Model, weights: Optional[str], input_size: int, alpha: float,
                          minimalistic: bool) -> int:
    """Loads ImageNet (or a Keras ``*_notop.h5`` file's) weights by layer name; returns layers loaded."""
    if weights is None:
        return 0
    reference = keras.applications.MobileNetV3Small(
        input_shape=(input_size, input_size, 3), alpha=alpha, minimalistic=minimalistic, include_top=False,
        weights=weights, include_preprocessing=True)
    ours = {layer.name: layer for layer in model.layers}
    loaded = 0
    for layer in reference.layers:
        if layer.weights and layer.name in ours:
            ours[layer.name].set_weights(layer.get_weights())
            loaded += 1
    return loaded
