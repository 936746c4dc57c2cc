"""The edge/ C++ sources and generated model files compile (syntax and types) against the TFLM API they use."""

import shutil
import subprocess

import pytest

from conftest import REPO, tiny_int8_flatbuffer


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
@pytest.mark.slow
def test_edge_sources_compile_against_tflm_api(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    import tflite_to_c

    import numpy as np

    # a small int8 model with the student's kinds of ops, and its sidecar
    images = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    path = tmp_path / "m.tflite"
    path.write_bytes(tiny_int8_flatbuffer(16))
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
    # main.cc twice: the board's endless loop, and the bounded run `make -C edge host|qemu` builds
    builds = [(source, []) for source in sources] + [(REPO / "edge" / "main.cc", ["-DMELANOMA_INFERENCES=3"])]
    for source, defines in builds:
        result = subprocess.run(["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", *defines,
                                 f"-I{REPO / 'tests' / 'tflm_api'}", f"-I{REPO / 'edge'}", f"-I{tmp_path / 'gen'}",
                                 str(source)], capture_output=True, text=True)
        assert result.returncode == 0, f"{source.name} {defines}:\n{result.stderr}"


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_edge_makefile_takes_relative_paths_from_the_repository_root(tmp_path):
    """`make -C edge ...` runs in edge/: the paths a user types at the repository root must still point there."""
    import os

    def make(*args):
        return subprocess.run(["make", "--no-print-directory", "-C", "edge", *args], cwd=REPO,
                              capture_output=True, text=True)

    printed = make("-n", "generate", "MODEL=runs/x/int8.tflite", "IMAGE=lesion.jpg", "PYTHON=.venv/bin/python").stdout
    assert f"{REPO}/.venv/bin/python {REPO}/edge/../tools/tflite_to_c.py {REPO}/runs/x/int8.tflite" in printed
    assert f"--image {REPO}/lesion.jpg" in printed
    # a bare command name is left to PATH
    assert make("-n", "generate", "MODEL=m.tflite", "PYTHON=python3").stdout.lstrip().splitlines()[1].startswith(
        "python3 ")

    checkout = tmp_path / "tflite-micro"
    (checkout / "tensorflow/lite/micro/tools/make").mkdir(parents=True)
    (checkout / "tensorflow/lite/micro/tools/make/Makefile").write_text("")
    found = make("check-tflm", f"TFLM_DIR={os.path.relpath(checkout, REPO)}")
    assert "is not a tflite-micro checkout" not in found.stdout + found.stderr
    missing = make("check-tflm", "TFLM_DIR=no/such/checkout")
    assert missing.returncode != 0
    assert f"{REPO}/no/such/checkout is not a tflite-micro checkout" in missing.stdout
