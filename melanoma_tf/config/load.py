"""Reading configuration: strict YAML into the typed schema, ``--set key=value``, ``base:`` files.

PyYAML reads ``1e-4`` as the string ``"1e-4"`` (YAML 1.1 wants ``1.0e-4``),
so float fields accept numeric strings. An unknown key is an error naming it
and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from melanoma_tf.config.schema import Config, ConfigError, SweepConfig
from melanoma_tf.files import write_atomic

# Aliases of the sweep's quantization modes (the seed document's names for int4).
QUANT_ALIASES = {"4-bit": "int4", "4bit": "int4"}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Converts a YAML value to the declared field type or raises ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}{hint}")
        return value
    if origin is tuple:
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if _is_dataclass_type(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(number)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)  # "1e-4" from PyYAML becomes 0.0001
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {key}")


# Names from other frameworks that string similarity would not map to ours.
_ALIASES = {"learning_rate": "lr", "num_epochs": "epochs", "bs": "batch_size", "t": "temperature",
            "img_size": "image_size", "input_size": "image_size", "size": "image_size", "kd_alpha": "alpha"}


def _build(cls: type, values: dict, prefix: str = "", noun: str = "config key") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            alias = _ALIASES.get(str(key).lower())
            close = [alias] if alias in names else difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {names}"
            raise ConfigError(f"unknown {noun} '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def _nest(dotted: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict:
    """Turns ``section.key=value`` into a nested dict; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {err}") from None
    return _nest(key, value)


def from_dict(values: dict | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Builds and validates a Config from a plain dict plus ``key=value`` overrides."""
    values = dict(values or {})
    for text in overrides:
        values = _merge(values, parse_override(text))
    return _build(Config, values).validate()


def _read_mapping(path: Path, of: str) -> dict:
    """A YAML file whose top level is a mapping; errors name the file."""
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of {of}")
    return values


def _read_with_base(path: Path, seen: tuple[Path, ...]) -> dict:
    """A config file's mapping; ``base: other.yaml`` (relative to the file) is read first and updated by the rest."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (the base of {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        raise ConfigError(f"{path}: base configs form a cycle ({' -> '.join(str(p) for p in seen)})")
    values = _read_mapping(path, "sections")
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a config file name, got {base!r}")
    return _merge(_read_with_base(path.parent / base, seen + (path.resolve(),)), values)


def load(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Loads a YAML config file, applies overrides and validates it.

    A file may start from another with ``base: other.yaml`` (relative to it),
    then change only some keys.

    Args:
      path: the YAML file.
      overrides: ``section.key=value`` strings, applied in order.

    Returns:
      The frozen, validated Config. If ``output.name`` is unset it becomes the file's stem.

    Raises:
      ConfigError: naming the file and the offending key.
    """
    path = Path(path)
    values = _read_with_base(path, ())
    try:
        config = from_dict(values, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if config.output.name is None:
        config = replace(config, "output.name", path.stem)
    return config


def replace(config: Config, dotted: str, value: Any) -> Config:
    """Returns a copy of config with one dotted key replaced (and re-validated)."""
    parts = dotted.split(".")

    def _rec(obj: Any, idx: int) -> Any:
        if idx == len(parts) - 1:
            return dataclasses.replace(obj, **{parts[idx]: value})
        child = getattr(obj, parts[idx])
        return dataclasses.replace(obj, **{parts[idx]: _rec(child, idx + 1)})

    return _rec(config, 0).validate()


def to_dict(config: Config) -> dict:
    """A plain-dict (YAML-ready) view of the config; tuples become lists."""

    def _plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: _plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_plain(v) for v in value]
        return value

    return _plain(dataclasses.asdict(config))


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def fingerprint(config: Config, ignore: tuple[str, ...] = ("output", "train.verbose")) -> str:
    """A short hash of the config without the given keys, to match resumed runs."""
    values = to_dict(config)
    for dotted in ignore:
        node = values
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node[part]
        node.pop(parts[-1], None)
    return hashlib.sha256(yaml.safe_dump(values, sort_keys=True).encode()).hexdigest()[:16]


def save(config: Config, path: str | os.PathLike) -> None:
    """Writes the resolved config as YAML, atomically."""
    write_atomic(path, to_yaml(config))


def load_sweep_config(path: str | os.PathLike) -> SweepConfig:
    """Reads and checks a sweep YAML into a :class:`SweepConfig`; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    raw = _read_mapping(path, "sweep keys")
    ray = raw.get("ray") or {}
    ray_keys = [f.name for f in dataclasses.fields(SweepConfig.__dataclass_fields__["ray"].default_factory)]
    if not isinstance(ray, dict) or set(ray) - set(ray_keys):
        raise ConfigError(f"{path}: ray: expected a mapping with keys {ray_keys}, got {ray!r}")
    raw = {**raw, "quantize": [QUANT_ALIASES.get(str(m), str(m)) for m in (raw.get("quantize") or [])]}
    try:
        return _build(SweepConfig, raw, noun="sweep key").validate()
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
