"""Bad model files give one clear error naming the file: never a crash, a hang or a raw traceback."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, tiny_int8_flatbuffer
from melanoma_tf import evaluate as E
from melanoma_tf.tflite import FlatbufferError, TFLiteModel, verify_flatbuffer, verify_model_file


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory):
    """A tiny int8 flatbuffer with the student's input/output contract, and a sidecar vouching for it."""
    folder = tmp_path_factory.mktemp("model")
    path = folder / "m.tflite"
    blob = tiny_int8_flatbuffer(16)
    path.write_bytes(blob)
    path.with_suffix(".json").write_text(json.dumps({"model": "m.tflite", "size_bytes": len(blob),
                                                     "sha256": hashlib.sha256(blob).hexdigest(), "threshold": 0.5,
                                                     "input_size": 16, "labels": "binary"}))
    return path


def test_cut_short_file_is_a_clear_error_naming_it(int8_model, tmp_path):
    blob = int8_model.read_bytes()
    cut = tmp_path / "cut.tflite"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(FlatbufferError, match=r"cut.tflite: corrupt or cut-short TFLite flatbuffer \(1,"):
        verify_flatbuffer(cut)
    (tmp_path / "text.tflite").write_text("hello, I am not a model")
    with pytest.raises(FlatbufferError, match="text.tflite: not a TFLite flatbuffer"):
        TFLiteModel(tmp_path / "text.tflite")


def test_sidecar_that_does_not_match_its_model(int8_model, tmp_path):
    blob = bytearray(int8_model.read_bytes())
    sidecar = json.loads(int8_model.with_suffix(".json").read_text())
    target = tmp_path / "m.tflite"
    # 16 bytes more (what a copy tool's padding leaves): the flatbuffer stays valid, only the size check sees it.
    target.write_bytes(bytes(blob) + bytes(16))
    target.with_suffix(".json").write_text(json.dumps(sidecar))
    verify_flatbuffer(target)  # structurally fine
    with pytest.raises(FlatbufferError, match=rf"m.tflite: {len(blob) + 16:,} bytes, its sidecar m.json says "
                                              rf"{len(blob):,}"):
        verify_model_file(target)
    # One weight byte changed: well-formed, runs, but not the model the sidecar describes.
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(bytes(blob), 0)
    weights = max((bytes(model.Buffers(b).DataAsNumpy()) for b in range(model.BuffersLength())
                   if model.Buffers(b).DataLength()), key=len)
    offset = bytes(blob).find(weights) + 1
    blob[offset] ^= 0x10
    target.write_bytes(bytes(blob))
    with pytest.raises(FlatbufferError, match="sha256 differs from its sidecar m.json"):
        verify_model_file(target)
    target.with_suffix(".json").write_text("{not json")
    with pytest.raises(FlatbufferError, match="m.json: invalid sidecar JSON"):
        verify_model_file(target)


def test_model_whose_input_is_not_one_image(tmp_path):
    from melanoma_tf.backend import keras, tf

    inputs = keras.Input((10,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    path = tmp_path / "tabular.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    with pytest.raises(FlatbufferError, match=r"tabular.tflite: expected one image input \(1, H, W, 3\)"):
        TFLiteModel(path)


def test_evaluate_command_reports_a_bad_model_in_one_line(int8_model, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(images / "a.jpg")
    (tmp_path / "labels.csv").write_text("image_id,label\na,1\n")
    cut = tmp_path / "cut.tflite"
    cut.write_bytes(int8_model.read_bytes()[:1000])
    cut.with_suffix(".json").write_text(int8_model.with_suffix(".json").read_text())
    code = E.main(["--model", str(cut), "--images", str(images), "--labels", str(tmp_path / "labels.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "cut.tflite" in err[0]
    assert "Traceback" not in "\n".join(err)


@pytest.mark.slow
@pytest.mark.parametrize("with_sidecar", [False, True])
def test_fuzz_damaged_flatbuffers_never_crash(int8_model, tmp_path, with_sidecar):
    """Cuts at 40 offsets and 80 single-bit flips; a crash would kill the child process (exit < 0 or 134)."""
    argv = [sys.executable, str(REPO / "tests" / "fuzz_tflite.py"), str(int8_model), str(tmp_path), "40", "80", "7"]
    result = subprocess.run(argv + (["--sidecar"] if with_sidecar else []), capture_output=True, text=True,
                            timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    words = result.stdout.split()
    counts = dict(zip(words[::2], map(int, words[1::2])))
    # Every cut is refused by the project's own error naming the file (the last offset still drops a byte).
    assert counts["cut_refused"] == 40 and counts["cut_ok"] == 0 and counts["cut_other"] == 0, result.stderr
    # A flip runs or is refused the same way: never another exception.
    assert counts["flip_refused"] + counts["flip_ok"] == 80 and counts["flip_other"] == 0, result.stderr
    if with_sidecar:
        assert counts["flip_ok"] == 0  # its sidecar's size and sha256 catch every damaged copy


def test_a_keras_file_that_is_not_a_model_is_named(tmp_path, capsys):
    import zipfile

    from melanoma_tf.backend import keras
    from melanoma_tf.models import ModelFileError, load_model, save_model

    inputs = keras.Input((8,))
    good = tmp_path / "good.keras"
    save_model(keras.Model(inputs, keras.layers.Dense(1)(inputs)), good)
    assert load_model(good).count_params() == 9
    text = tmp_path / "notes.keras"
    text.write_text("not a model")
    no_config = tmp_path / "empty.keras"
    with zipfile.ZipFile(no_config, "w") as archive:
        archive.writestr("readme.txt", "hello")
    cut = tmp_path / "cut.keras"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path, message in ((text, "not a Keras model file"), (no_config, r"not a Keras model file \(no config.json inside"),
                          (cut, "not a Keras model file")):
        with pytest.raises(ModelFileError, match=f"{path.name}: {message}"):
            load_model(path)
    # a command says it in one line and exits 2: here a distillation whose teacher is that file
    from melanoma_tf import train

    code = train.main(["--config", str(REPO / "configs" / "quickstart.yaml"), "--set", "stages=[distill]",
                       "--set", f"distill.teacher=[{text}]", "--set", f"output.dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "notes.keras: not a Keras model file" in err[-1]
