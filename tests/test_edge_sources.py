"""The edge/ C++ sources and generated model files compile (syntax and types) against the TFLM API they use."""

import shutil
import subprocess

import pytest

from conftest import REPO


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
@pytest.mark.slow
def test_edge_sources_compile_against_tflm_api(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    import tflite_to_c

    from melanoma_tf.backend import keras, tf
    from melanoma_tf.mobilenet_v3 import HardSwish

    # a small int8 model with the student's kinds of ops, and its sidecar
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs))
    x = keras.layers.GlobalAveragePooling2D()(HardSwish()(x))
    model = keras.Model(inputs, keras.layers.Dense(1)(x))
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    import numpy as np

    images = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    converter.representative_dataset = lambda: ([img[None]] for img in images)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    path = tmp_path / "m.tflite"
    path.write_bytes(converter.convert())
    from melanoma_tf.quantize import flatbuffer_details

    details = flatbuffer_details(path)
    import json

    path.with_suffix(".json").write_text(json.dumps({**details, "input_size": 16, "threshold_logit": 0.0,
                                                     "refer_margin_logit": 0.5, "temperature": 1.0,
                                                     "tflm_arena_bytes": 8192}))
    from PIL import Image

    Image.fromarray(images[0].astype(np.uint8)).save(tmp_path / "img.png")
    tflite_to_c.generate(path, tmp_path / "gen", tmp_path / "img.png")
    sources = sorted((REPO / "edge").glob("*.cc")) + sorted((tmp_path / "gen").glob("*.cc"))
    assert {p.name for p in sources} >= {"main.cc", "main_functions.cc", "image_provider.cc",
                                          "detection_responder.cc", "melanoma_test.cc", "model_data.cc",
                                          "test_image.cc"}
    for source in sources:
        result = subprocess.run(["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-fsyntax-only",
                                 f"-I{REPO / 'tests' / 'tflm_api'}", f"-I{REPO / 'edge'}", f"-I{tmp_path / 'gen'}",
                                 str(source)], capture_output=True, text=True)
        assert result.returncode == 0, f"{source.name}:\n{result.stderr}"
