"""Opens damaged copies of a .tflite the way every command does; run as a script by test_model_files.py.

Usage: python tests/fuzz_tflite.py MODEL.tflite WORKDIR N_CUTS N_FLIPS SEED [--sidecar]

With --sidecar, MODEL's sidecar (``MODEL.json``, with its size and sha256) is put beside every damaged copy.

Each damaged copy (cut short at many offsets, or one byte flipped) must give a clear error
(FlatbufferError / ValueError / RuntimeError) or a result: a crash kills this process, which the test sees.
Prints one line: "errors E ok K".
"""

import sys
from pathlib import Path

import numpy as np

from melanoma_tf.tflite import FlatbufferError, TFLiteModel


def attempt(path: Path, size: int) -> str:
    try:
        model = TFLiteModel(path)
        model.predict(np.zeros((1, size, size, 3), np.float32))
        return "ok"
    except (FlatbufferError, ValueError, RuntimeError):
        return "error"


def main() -> int:
    source, work = Path(sys.argv[1]), Path(sys.argv[2])
    n_cuts, n_flips, seed = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    blob = source.read_bytes()
    size = TFLiteModel(source).input_shape[1]
    rng = np.random.default_rng(seed)
    counts = {"ok": 0, "error": 0}
    target = work / "damaged.tflite"
    if "--sidecar" in sys.argv:
        (work / "damaged.json").write_text(source.with_suffix(".json").read_text())
    for cut in np.unique(np.linspace(0, len(blob) - 1, n_cuts).astype(int)):
        target.write_bytes(blob[:cut])
        counts[attempt(target, size)] += 1
    for offset in rng.integers(0, len(blob), n_flips):
        damaged = bytearray(blob)
        damaged[offset] ^= 1 << int(rng.integers(0, 8))
        target.write_bytes(bytes(damaged))
        counts[attempt(target, size)] += 1
    print(f"errors {counts['error']} ok {counts['ok']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
