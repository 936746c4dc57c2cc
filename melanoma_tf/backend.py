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

__all__ = ["tf", "keras", "set_global_seed"]


def set_global_seed(seed: int) -> None:
    """Seeds Python, NumPy and TensorFlow random generators."""
    keras.utils.set_random_seed(int(seed))
