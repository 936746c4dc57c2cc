"""The edge/ C++ sources and generated model files compile against the TFLM API they use, and the board's
decision code, compiled and run on this machine, decides every int8 score as Python does."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, tiny_int8_flatbuffer

sys.path.insert(0, str(REPO / "tools"))
import tflite_to_c  # noqa: E402


def need(tool: str) -> None:
    """Skips without ``tool`` on a developer's machine; under CI (where the README installs it) that is a failure."""
    if shutil.which(tool) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} not installed: the README's test command installs it (apt-get install g++ make)")
        pytest.skip(f"{tool} not installed")


def tiny_model_with_sidecar(folder, **sidecar):
    """The tiny int8 flatbuffer and a sidecar vouching for it, with the given decision settings."""
    from melanoma_tf.quantize import flatbuffer_details

    path = folder / "m.tflite"
    path.write_bytes(tiny_int8_flatbuffer(16))
    path.with_suffix(".json").write_text(json.dumps({**flatbuffer_details(path), "input_size": 16,
                                                     "tflm_arena_bytes": 8192, **sidecar}))
    return path


@pytest.mark.slow
def test_edge_sources_compile_against_tflm_api(tmp_path):
    need("g++")
    # a small int8 model with the student's kinds of ops, and its sidecar
    images = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    path = tiny_model_with_sidecar(tmp_path, threshold_logit=0.0, refer_margin_logit=0.5, temperature=1.0)
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


def test_edge_makefile_takes_relative_paths_from_the_repository_root(tmp_path):
    """`make -C edge ...` runs in edge/: the paths a user types at the repository root must still point there."""
    need("make")

    def make(*args):
        return subprocess.run(["make", "--no-print-directory", "-C", "edge", *args], cwd=REPO,
                              capture_output=True, text=True)

    printed = make("-n", "generate", "MODEL=runs/x/int8.tflite", "IMAGE=lesion.jpg", "PYTHON=.venv/bin/python").stdout
    assert f"{REPO}/.venv/bin/python {REPO}/edge/../tools/tflite_to_c.py {REPO}/runs/x/int8.tflite" in printed
    assert f"--image {REPO}/lesion.jpg" in printed
    # a bare command name is left to PATH
    lines = make("-n", "generate", "MODEL=m.tflite", "IMAGE=x.jpg", "PYTHON=python3").stdout.strip().splitlines()
    assert lines[-2].startswith("python3 ") and lines[-3].startswith("rm -rf ")
    # without IMAGE: a clear refusal (the build always compiles the test image; an old one must not stay)
    no_image = make("generate", "MODEL=m.tflite")
    assert no_image.returncode != 0 and "set IMAGE=path/to/lesion.jpg" in no_image.stdout

    checkout = tmp_path / "tflite-micro"
    (checkout / "tensorflow/lite/micro/tools/make").mkdir(parents=True)
    (checkout / "tensorflow/lite/micro/tools/make/Makefile").write_text("")
    found = make("check-tflm", f"TFLM_DIR={os.path.relpath(checkout, REPO)}")
    assert "is not a tflite-micro checkout" not in found.stdout + found.stderr
    missing = make("check-tflm", "TFLM_DIR=no/such/checkout")
    assert missing.returncode != 0
    assert f"{REPO}/no/such/checkout is not a tflite-micro checkout" in missing.stdout


HARNESS = r"""
#include <cstdarg>
#include <cstdio>

#include "detection_responder.h"

void MicroPrintf(const char* format, ...) {
  va_list args;
  va_start(args, format);
  std::vprintf(format, args);
  va_end(args);
  std::printf("\n");
}

int main() {
  for (int score = -128; score <= 127; ++score) {
    std::printf("decision %d %d\n", score, static_cast<int>(Decide(static_cast<int8_t>(score))));
    RespondToDetection(static_cast<int8_t>(score));
  }
  return 0;
}
"""


@pytest.mark.parametrize("variant", range(12))
def test_the_board_decides_every_int8_score_as_python_does(tmp_path, variant):
    """The real Decide() and RespondToDetection(), compiled and run here, against export_app.decision and the
    calibrated probability for all 256 int8 scores: the shipped sidecar, then thresholds and bands drawn at random
    (the old ceil/round constants moved a band edge by one step)."""
    import re

    from melanoma_tf.export_app import decision, shown_probability

    need("g++")
    shipped = json.loads((REPO / "results" / "reference_ham10000" / "student_int8.json").read_text())
    keys = ("output_scale", "output_zero_point", "threshold_logit", "refer_margin_logit", "temperature",
            "calibration", "threshold")
    settings = {k: shipped[k] for k in keys if k in shipped}
    if variant:
        rng = np.random.default_rng(variant)
        settings.update(output_scale=float(rng.uniform(0.02, 0.2)), output_zero_point=int(rng.integers(-20, 20)),
                        threshold_logit=float(rng.uniform(-3, 3)), refer_margin_logit=float(rng.uniform(0, 0.8)),
                        temperature=float(rng.uniform(0.7, 2.0)))
    model = tiny_model_with_sidecar(tmp_path, **settings)
    tflite_to_c.generate(model, tmp_path / "gen")
    (tmp_path / "harness.cc").write_text(HARNESS)
    binary = tmp_path / "decide"
    build = subprocess.run(["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{REPO / 'tests' / 'tflm_api'}",
                            f"-I{REPO / 'edge'}", f"-I{tmp_path / 'gen'}", str(tmp_path / "harness.cc"),
                            str(REPO / "edge" / "detection_responder.cc"), "-o", str(binary)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    output = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout
    names = {0: "not_melanoma", 1: "melanoma", 2: "refer"}
    board = {int(q): names[int(d)] for q, d in re.findall(r"decision (-?\d+) (\d)", output)}
    printed = [int(p) for p in re.findall(r"calibrated probability (\d+)/1000", output)]
    assert len(board) == 256 and len(printed) == 256
    scale, zero = settings["output_scale"], settings["output_zero_point"]
    python = {q: decision((q - zero) * scale, settings) for q in range(-128, 128)}
    assert board == python, {q: (board[q], python[q]) for q in python if board[q] != python[q]}
    assert {"melanoma", "not_melanoma"} <= set(python.values())
    if variant == 0:
        assert "refer" in python.values()  # the shipped band holds int8 scores
    expected = [1000 * shown_probability((q - zero) * scale, settings) for q in range(-128, 128)]
    assert all(abs(p - e) <= 1.0 for p, e in zip(printed, expected))  # float32 on the board, truncated to 1/1000
