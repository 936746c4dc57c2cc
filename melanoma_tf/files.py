"""Atomic file writes: a run folder never holds a half-written file."""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes a file via a temporary file in the same folder and a rename.

    The file gets the permissions ``open()`` would give it (0666 less the umask, applied by the system
    when the temporary file is created), not ``mkstemp``'s 0600: a model or sidecar served by a web
    server or read by another user stays readable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Writes JSON (sorted keys, 2-space indent), atomically; NaN and infinities are written as ``null``.

    A metric that is undefined (ROC-AUC of a subgroup with one class) is NaN in Python, but NaN is not
    JSON: ``JSON.parse`` and ``jq`` refuse a file holding it.
    """
    text = json.dumps(_finite(payload), indent=2, sort_keys=True, default=_json_default, allow_nan=False)
    write_atomic(path, text + "\n")


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float (NumPy's too) replaced by None, containers walked."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # NumPy scalars and arrays
        return _finite(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # NumPy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
