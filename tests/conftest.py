"""Shared fixtures: a small synthetic HAM10000-layout dataset and the real shared subset."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]

# Decode-check results of the test data go to a per-session folder, not the user's ~/.cache
# (set before any test builds a subprocess environment).
os.environ["MELANOMA_TF_CACHE"] = tempfile.mkdtemp(prefix="melanoma_tf_cache_")
SHARED_HAM = Path(os.environ.get("MELANOMA_TF_HAM10000", REPO.parent / "shared" / "data" / "ham10000"))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A 160-lesion synthetic dataset at 48 px (some lesions with two images)."""
    from melanoma_tf import synthetic

    return synthetic.generate(tmp_path_factory.mktemp("synthetic"), n_lesions=160, melanoma_fraction=0.3,
                              image_size=48, second_image_fraction=0.25, seed=7)


@pytest.fixture(scope="session")
def ham_root() -> Path:
    """The shared HAM10000 subset; tests using it skip, with the reason, when it is absent."""
    if not (SHARED_HAM / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"real HAM10000 data not found at {SHARED_HAM} (set MELANOMA_TF_HAM10000)")
    return SHARED_HAM


def tiny_overrides(root: Path, out: Path, **extra) -> list[str]:
    """--set overrides for a fast run: 32 px, minimalistic narrow student, 2 epochs, quiet."""
    values = {
        "data.root": str(root), "data.image_size": 32, "data.augment.rotation": 0.0,
        "student.minimalistic": True, "student.alpha": 0.75,
        "train.epochs": 2, "train.batch_size": 32, "train.verbose": 0, "output.dir": str(out),
        "data.external": "[]",  # wiring tests do not score the real external set
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def tiny_int8_flatbuffer(size: int = 16) -> bytes:
    """A small full-int8 flatbuffer with the student's kinds of ops (conv, hard-swish, pooling, dense)."""
    import numpy as np

    from melanoma_tf.backend import keras, tf
    from melanoma_tf.mobilenet_v3 import HardSwish
    from melanoma_tf.quantize import keras_converter

    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs))
    x = keras.layers.GlobalAveragePooling2D()(HardSwish()(x))
    model = keras.Model(inputs, keras.layers.Dense(1)(x))
    converter = keras_converter(model)  # converted the way melanoma_tf.quantize converts the student
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    images = np.random.default_rng(0).uniform(0, 255, (8, size, size, 3)).astype(np.float32)
    converter.representative_dataset = lambda: ([image[None]] for image in images)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    return converter.convert()


# The order in which modules start under `pytest -n 2 --dist loadfile` (with --no-loadscope-reorder,
# set in pyproject.toml): longest first, from `--durations=0` on 2 cores. xdist hands out whole
# modules, so a long module that starts last keeps one worker busy while the other sits idle.
# Modules not listed take under a minute each and follow in their usual order.
LONGEST_FIRST = ("test_train", "test_quantize", "test_sweep", "test_methods", "test_generalization",
                 "test_relational_train", "test_evaluate", "test_distribution", "test_data", "test_models")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: unlisted keep their order
