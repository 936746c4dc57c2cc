"""The one place that imports TensorFlow and Keras.

TF-MOT only supports Keras 2, so every model in melanoma_tf is built with
``tf_keras``. Importing TensorFlow through this module guarantees that
``TF_USE_LEGACY_KERAS`` is set before TensorFlow is first imported, so that
``tf.keras``, keras-cv and TF-MOT all agree on the same Keras.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
from tensorflow.python.framework import config as tf_framework_config  # noqa: E402

__all__ = ["tf", "keras", "set_global_seed", "make_strategy"]


def _split_cpu() -> None:
    """MELANOMA_TF_CPU_DEVICES=N splits the CPU into N logical devices (to try tf.distribute without GPUs)."""
    count = int(os.environ.get("MELANOMA_TF_CPU_DEVICES", "0") or 0)
    if count > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)


_split_cpu()


def make_strategy(name: str) -> "tf.distribute.Strategy":
    """The tf.distribute strategy for ``train.distribution``.

    ``mirrored`` replicates over every local GPU, or, with none, over the logical
    CPU devices (MELANOMA_TF_CPU_DEVICES); ``multi_worker`` reads the cluster from
    TF_CONFIG; ``none`` is the default single-device strategy.
    """
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
            d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"train.distribution: unknown strategy {name!r}")


def set_global_seed(seed: int, deterministic: bool = False) -> None:
    """Seeds Python, NumPy and TensorFlow random generators.

    ``deterministic`` also switches on TensorFlow's op determinism (for the rest of
    the process): the same seed then trains the same weights, bit for bit, on one machine;
    ``False`` switches it off again.
    """
    keras.utils.set_random_seed(int(seed))
    # keras-cv's augmentation layers draw from TensorFlow's global generator, which
    # is otherwise seeded from the clock.
    tf.random.set_global_generator(tf.random.Generator.from_seed(int(seed)))
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    elif tf_framework_config.is_op_determinism_enabled():
        # A run without it after one with it in the same process (a sweep, a test
        # session) trains as fast as it would alone; TensorFlow has no public inverse.
        tf_framework_config.disable_op_determinism()
