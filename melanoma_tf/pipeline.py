"""The tf.data input pipeline: decode, resize, cache, shuffle, batch, augment, prefetch.

Images leave the pipeline as float32 RGB in [0, 255]; every model carries its
own preprocessing, so a teacher and a student can share one batch. Decoded
images are cached as uint8 (a quarter of the float32 memory). keras-cv
augmentation runs on training batches only, outside the models.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from melanoma_tf.backend import keras, tf
from melanoma_tf.config import AugmentConfig


# Names how image files become pixels; part of every cache key built on decoded pixels, so entries
# made with another decoding (TensorFlow's fast DCT before 2026-12) are never reused.
DECODING = "jpeg-islow/bilinear-antialias/uint8"


def decode_rgb(contents: tf.Tensor) -> tf.Tensor:
    """An encoded image (JPEG, PNG, BMP, GIF) to uint8 RGB, JPEGs with the accurate integer DCT.

    TensorFlow's default JPEG decoding uses a fast, inexact DCT; Pillow, browsers and
    libjpeg's own default use the accurate one (``JDCT_ISLOW``), about 1 grey level apart
    on average and up to 6. Training, evaluation, the Pi tool, the app and the edge test
    image must all see the same pixels, so every runtime decodes the accurate way.
    """
    def jpeg():
        return tf.io.decode_jpeg(contents, channels=3, dct_method="INTEGER_ACCURATE")

    def other():
        return tf.io.decode_image(contents, channels=3, expand_animations=False)

    image = tf.cond(tf.io.is_jpeg(contents), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def decode_and_resize(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """Reads one image file to a uint8 ``image_size x image_size x 3`` tensor.

    Bilinear with antialiasing (TensorFlow's ScaleAndTranslate, triangle kernel widened by the
    downscale factor), rounded to uint8: ``tools/benchmark_tflite.py`` and the app re-implement
    exactly this, and ``tests/test_decoding.py`` holds them to it.
    """
    image = decode_rgb(tf.io.read_file(path))
    image = tf.image.resize(image, (image_size, image_size), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


class RandomColourCast(keras.layers.Layer):
    """Multiplies each channel by its own random gain in [1 - cast, 1 + cast]: another camera's white balance."""

    def __init__(self, cast: float, seed: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.cast, self.seed = cast, seed

    def call(self, images, training=True):
        if not training:
            return images
        gains = tf.random.uniform((tf.shape(images)[0], 1, 1, 3), 1.0 - self.cast, 1.0 + self.cast, seed=self.seed)
        return tf.clip_by_value(images * gains, 0.0, 255.0)


class RandomVignette(keras.layers.Layer):
    """Darkens the image towards its corners by a random fraction up to ``strength`` (a dermatoscope's vignette).

    The gain is ``1 - s * r^2 / 2`` with ``r`` the distance from the centre (1 at the
    edge midpoints, sqrt(2) in the corners), so the corners lose ``s``.
    """

    def __init__(self, strength: float, seed: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.strength, self.seed = strength, seed

    def call(self, images, training=True):
        if not training:
            return images
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        ys = tf.linspace(-1.0, 1.0, height)[:, None]
        xs = tf.linspace(-1.0, 1.0, width)[None, :]
        radius2 = (ys ** 2 + xs ** 2)[None, :, :, None]
        s = tf.random.uniform((tf.shape(images)[0], 1, 1, 1), 0.0, self.strength, seed=self.seed)
        return images * (1.0 - s * radius2 / 2.0)


def build_augmenter(cfg: AugmentConfig, seed: int, image_size: Optional[int] = None) -> Optional[keras.Sequential]:
    """keras-cv augmentation for float images in [0, 255]; None when everything is off.

    ``image_size`` is needed for the random resized crop (``crop_area_min < 1``).
    """
    import keras_cv

    layers = []
    if cfg.crop_area_min < 1:
        if image_size is None:
            raise ValueError("data.augment.crop_area_min needs the image size")
        layers.append(keras_cv.layers.RandomCropAndResize((image_size, image_size), (cfg.crop_area_min, 1.0),
                                                          (3 / 4, 4 / 3), seed=seed + 6))
    if cfg.flip:
        layers.append(keras_cv.layers.RandomFlip("horizontal_and_vertical", seed=seed))
    if cfg.rotation > 0:
        layers.append(keras_cv.layers.RandomRotation(cfg.rotation, fill_mode="reflect", seed=seed + 1))
    if cfg.zoom > 0:
        layers.append(keras_cv.layers.RandomZoom((-cfg.zoom, cfg.zoom), fill_mode="reflect", seed=seed + 2))
    if cfg.translate > 0:
        layers.append(keras_cv.layers.RandomTranslation(cfg.translate, cfg.translate, fill_mode="reflect",
                                                        seed=seed + 3))
    if any(v > 0 for v in (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)):
        # keras-cv's saturation factor 0.5 is the identity; hue is a fraction of the colour wheel.
        layers.append(keras_cv.layers.RandomColorJitter(
            value_range=(0, 255),
            brightness_factor=(-cfg.brightness, cfg.brightness),
            contrast_factor=(max(0.0, 0.5 - cfg.contrast), min(1.0, 0.5 + cfg.contrast)) if cfg.contrast else 0.5,
            saturation_factor=(0.5 - cfg.saturation, 0.5 + cfg.saturation),
            hue_factor=(0.0, cfg.hue),
            seed=seed + 4))
    if cfg.colour_cast > 0:
        layers.append(RandomColourCast(cfg.colour_cast, seed=seed + 7))
    if cfg.vignette > 0:
        layers.append(RandomVignette(cfg.vignette, seed=seed + 8))
    if cfg.blur_sigma > 0:
        layers.append(keras_cv.layers.RandomGaussianBlur(5, (0.0, cfg.blur_sigma), seed=seed + 9))
    if cfg.rand_augment:
        layers.append(keras_cv.layers.RandAugment(value_range=(0, 255), augmentations_per_image=2,
                                                  magnitude=cfg.rand_augment_magnitude, seed=seed + 5))
    if not layers:
        return None
    return keras.Sequential(layers, name="augment")


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Balanced class weights (n / (k * count)) from the training labels."""
    labels = np.asarray(labels)
    present = np.unique(labels)
    weights = np.ones(num_classes, dtype=np.float32)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return weights


def make_dataset(paths: list[str], labels: np.ndarray, image_size: int, batch_size: int, *,
                 binary: bool = True, training: bool = False, sample_weights: Optional[np.ndarray] = None,
                 teacher_logits: Optional[np.ndarray] = None, augmenter: Optional[keras.layers.Layer] = None,
                 cache: str = "memory", seed: int = 0, shuffle: Optional[bool] = None, with_index: bool = False,
                 two_views: bool = False) -> tf.data.Dataset:
    """Builds a batched dataset of ``(inputs, label, sample_weight)``.

    Args:
      paths: image files.
      labels: integer labels, aligned with paths.
      image_size: output side in pixels.
      batch_size: batch size.
      binary: labels as float ``(batch, 1)`` (binary) or int ``(batch,)`` (multiclass).
      training: shuffle and augment.
      sample_weights: per-image loss weights (class weights); ones if None.
      teacher_logits: cached teacher outputs per image; inputs become a dict
        ``{"image": ..., "teacher_logits": ...}`` (offline KD, augmentation-free logits).
      augmenter: a keras-cv pipeline applied to training batches.
      cache: ``memory``, ``none``, or a file prefix for an on-disk cache.
      seed: shuffle seed.
      shuffle: override the shuffling implied by ``training``.
      with_index: add ``"index"`` (the image's position in ``paths``) to the
        inputs dict (memory banks of relational distillation).
      two_views: add ``"image_teacher"``, a second, independent augmentation of
        each image (the mean teacher's view; the same image without an augmenter).

    Returns:
      A prefetched ``tf.data.Dataset``.
    """
    n = len(paths)
    labels = np.asarray(labels)
    label_tensor = labels.astype(np.float32).reshape(-1, 1) if binary else labels.astype(np.int32)
    weights = (np.ones(n, np.float32) if sample_weights is None else np.asarray(sample_weights, np.float32))
    images = tf.data.Dataset.from_tensor_slices(tf.constant(list(paths), dtype=tf.string)).map(
        lambda p: decode_and_resize(p, image_size), num_parallel_calls=tf.data.AUTOTUNE)
    if cache == "memory":
        images = images.cache()
    elif cache and cache != "none":
        # One cache file per image list and size: train and validation must never share one.
        import hashlib

        key = hashlib.sha1("\n".join([DECODING, *paths]).encode()).hexdigest()[:12]
        images = images.cache(f"{cache}_{image_size}px_{key}")
    extras = {}
    if teacher_logits is not None:
        extras["teacher_logits"] = tf.data.Dataset.from_tensor_slices(np.asarray(teacher_logits, np.float32))
    if with_index:
        extras["index"] = tf.data.Dataset.range(n)
    parts = [images, tf.data.Dataset.from_tensor_slices(label_tensor),
             tf.data.Dataset.from_tensor_slices(weights)]
    if extras:
        parts.append(tf.data.Dataset.zip(extras))
    ds = tf.data.Dataset.zip(tuple(parts))
    if training if shuffle is None else shuffle:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

    def _to_float(image, *rest):
        return (tf.cast(image, tf.float32), *rest)

    ds = ds.map(_to_float, num_parallel_calls=tf.data.AUTOTUNE)
    augment = training and augmenter is not None
    if augment or two_views:
        def _augment(image, label, weight, *extra):
            view = augmenter(image, training=True) if augment else image
            if two_views:
                second = augmenter(image, training=True) if augment else image
                extra = ({**(extra[0] if extra else {}), "image_teacher": second},)
            return (view, label, weight, *extra)

        ds = ds.map(_augment, num_parallel_calls=tf.data.AUTOTUNE)

    def _pack(image, label, weight, *extra):
        inputs = {"image": image, **extra[0]} if extra else image
        return inputs, label, weight

    return ds.map(_pack, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def load_images(paths: list[str], image_size: int, batch_size: int = 64) -> np.ndarray:
    """Decodes and resizes images exactly as the training pipeline does (float32, [0, 255])."""
    ds = make_dataset(paths, np.zeros(len(paths)), image_size, batch_size, cache="none")
    return np.concatenate([x.numpy() for x, _, _ in ds]) if paths else np.zeros((0, image_size, image_size, 3))
