"""Cost figures on a tiny model whose parameters and multiply-adds are counted by hand."""

import os

import pytest

from melanoma_tf import cost
from melanoma_tf.backend import keras, tf
from melanoma_tf.models import save_model


def tiny_model():
    x = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, padding="same")(x)  # 8*8 * 3*3*3 * 4 = 6912 MACs; 3*3*3*4 + 4 = 112 params
    h = keras.layers.DepthwiseConv2D(3, padding="same")(h)  # 8*8 * 3*3 * 4 = 2304 MACs; 36 + 4 = 40 params
    h = keras.layers.Conv2D(6, 1, strides=2)(h)  # 4*4 * 4 * 6 = 384 MACs; 24 + 6 = 30 params
    h = keras.layers.GlobalAveragePooling2D()(h)
    out = keras.layers.Dense(2)(h)  # 6 * 2 = 12 MACs; 12 + 2 = 14 params
    return keras.Model(x, out)


def test_params_and_macs_by_hand():
    model = tiny_model()
    assert cost.count_params(model) == 112 + 40 + 30 + 14
    assert cost.count_macs(model) == 6912 + 2304 + 384 + 12


def test_macs_agree_with_tensorflow_profiler():
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    model = tiny_model()
    concrete = tf.function(lambda x: model(x)).get_concrete_function(tf.TensorSpec((1, 8, 8, 3), tf.float32))
    graph = convert_variables_to_constants_v2(concrete).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    flops = tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops
    # the profiler counts 2 FLOPs per multiply-add plus bias adds and pooling
    assert 2 * cost.count_macs(model) <= flops <= 2 * cost.count_macs(model) * 1.1


def test_model_cost_keras_and_tflite(tmp_path):
    model = tiny_model()
    path = tmp_path / "tiny.keras"
    save_model(model, path)
    result = cost.model_cost(path, keras_model=model, runs=50, warmup=3)
    assert result["size_mb"] == pytest.approx(os.path.getsize(path) / 1e6)
    assert result["params"] == 196 and result["flops"] == 9612 and result["input_size"] == 8
    assert result["latency_runs"] == 50
    assert 0 < result["latency_ms_min"] <= result["latency_ms_median"] <= result["latency_ms_p90"]
    tflite = tmp_path / "tiny.tflite"
    tflite.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    lite = cost.model_cost(tflite, reference_keras=model, runs=50)
    assert lite["runtime"] == "tflite" and lite["flops"] == 9612
    assert lite["size_mb"] == pytest.approx(os.path.getsize(tflite) / 1e6)
    assert lite["latency_ms_median"] > 0
