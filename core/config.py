"""Typed configuration: dataclasses loaded from YAML files with ``key=value`` overrides.

Every job (ingest, reader, train, sample, serve) reads one :class:`PlatformConfig`. A YAML file
sets any subset of its sections; the defaults are the embedded laptop setting (``tiny`` preset,
local Ray, MLflow on a sqlite file). Overrides use dotted paths, e.g.
``train.max_steps=20 ray.num_cpus=2``; values are parsed as YAML scalars/lists.

Unknown keys are errors that name the full dotted path and list the valid keys, so a typo in a
config never silently falls back to a default.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from core.sections import PlatformConfig

__all__ = ["ConfigError", "PlatformConfig", "add_config_arguments", "dump_yaml", "flatten", "load_config",
           "load_platform_config", "parse_overrides", "read_yaml", "to_dict"]

T = TypeVar("T")


class ConfigError(ValueError):
    """The foundation's error: a config file or override that does not fit the dataclass schema,
    or values that cannot work together (e.g. a motion history the segment rule cannot cut)."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert a YAML value to type ``tp`` (dataclass, Optional, list/tuple, scalar)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{path}: {value!r} fits none of {tp}: {'; '.join(errors)}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


#: Keys that older versions wrote and this one no longer has: dotted path -> where the setting went.
#: An empty (null) value is dropped, so packages written before the change still load; a set
#: value is an error that names the new place (and never echoes the value: it may be a secret).
REMOVED_KEYS = {
    "serve.auth_token": "client tokens are read from the LOOPY_SERVE_TOKENS_FILE or LOOPY_SERVE_TOKENS "
                        "environment variable (docs/SERVICE.md), never from the config",
}


#: Keys that older versions wrote and that no longer mean anything: dropped whatever their value,
#: so every package and ingest folder written before still loads (dotted path -> why).
RETIRED_KEYS = {
    "ingest.scale_search_s": "the scale search samples ingest.scale_search_frames frames over the whole video",
}


def _drop_removed(data: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    where = f"{path}." if path else ""
    removed = [k for k in data if f"{where}{k}" in REMOVED_KEYS]
    for key in removed:
        if data[key] is not None:
            raise ConfigError(f"config key {where}{key} was removed: {REMOVED_KEYS[where + key]}")
    retired = [k for k in data if f"{where}{k}" in RETIRED_KEYS]
    return {k: v for k, v in data.items() if k not in removed and k not in retired}


def _build(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    types_ = _field_types(cls)
    data = _drop_removed(data, path)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!s}; valid keys in "
            f"{path or 'the top level'}: {', '.join(sorted(types_))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, types_[name], f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path or cls.__name__}: {exc}") from exc


def _deep_merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: Sequence[str]) -> dict:
    """``["a.b=1", "c=[1,2]"]`` -> ``{"a": {"b": 1}, "c": [1, 2]}``."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with path.open() as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)
    if base:
        data = _deep_merge(read_yaml(path.parent / base), data)
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from defaults, then the YAML file ``path`` (may name a ``base:`` file), then overrides."""
    data: dict = {}
    if path is not None:
        data = read_yaml(path)
    data = _deep_merge(data, parse_overrides(overrides))
    return _build(cls, data)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a config to ``{"section.key": value}`` (for MLflow params)."""
    data = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` plus trailing ``section.key=value`` overrides."""
    parser.add_argument("--config", default=None, help="YAML config file (default: embedded tiny preset)")
    parser.add_argument("overrides", nargs="*", default=[], help="section.key=value overrides")


def load_platform_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PlatformConfig:
    return load_config(PlatformConfig, path, overrides)
