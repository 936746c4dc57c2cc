"""Opens damaged copies of a .tflite the way every command does; run as a script by test_model_files.py.

Usage: python tests/fuzz_tflite.py MODEL.tflite WORKDIR N_CUTS N_FLIPS SEED [--sidecar]

With --sidecar, MODEL's sidecar (``MODEL.json``, with its size and sha256) is put beside every damaged copy.

Each damaged copy (cut short at many offsets, or one bit flipped) is ``refused`` (the project's
FlatbufferError naming the file), ``ok`` (it runs), or ``other`` (any other exception, shown on stderr);
a crash kills this process, which the test sees. Prints one line of counts:
"cut_refused C cut_ok . cut_other . flip_refused F flip_ok K flip_other .".
"""

import sys
from pathlib import Path

import numpy as np

from melanoma_tf.tflite import FlatbufferError, TFLiteModel


def attempt(path: Path, size: int) -> str:
    """``refused`` (the project's FlatbufferError naming the file), ``ok``, or ``other: ...`` (anything else)."""
    try:
        model = TFLiteModel(path)
        model.predict(np.zeros((1, size, size, 3), np.float32))
        return "ok"
    except FlatbufferError as err:
        return "refused" if path.name in str(err) else f"other: FlatbufferError without the file name: {err}"
    except Exception as err:  # noqa: BLE001 - counted and shown: the test accepts none of these
        return f"other: {type(err).__name__}: {err}"


def main() -> int:
    source, work = Path(sys.argv[1]), Path(sys.argv[2])
    n_cuts, n_flips, seed = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    blob = source.read_bytes()
    size = TFLiteModel(source).input_shape[1]
    rng = np.random.default_rng(seed)
    counts = {f"{kind}_{outcome}": 0 for kind in ("cut", "flip") for outcome in ("refused", "ok", "other")}
    others = []
    target = work / "damaged.tflite"
    if "--sidecar" in sys.argv:
        (work / "damaged.json").write_text(source.with_suffix(".json").read_text())

    def record(kind: str, outcome: str) -> None:
        counts[f"{kind}_{outcome.split(':')[0]}"] += 1
        if outcome.startswith("other"):
            others.append(f"{kind}: {outcome}")

    for cut in np.unique(np.linspace(0, len(blob) - 1, n_cuts).astype(int)):
        target.write_bytes(blob[:cut])
        record("cut", attempt(target, size))
    for offset in rng.integers(0, len(blob), n_flips):
        damaged = bytearray(blob)
        damaged[offset] ^= 1 << int(rng.integers(0, 8))
        target.write_bytes(bytes(damaged))
        record("flip", attempt(target, size))
    print(" ".join(f"{k} {v}" for k, v in counts.items()))
    for line in others[:5]:
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
