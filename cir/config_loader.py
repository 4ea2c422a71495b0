"""The config loader: typed dataclasses loaded from YAML, with ``key=value`` overrides.

Each section's dataclass lives beside the code it configures (`RolloutConfig` in
`cir.rollout`, `AlgoConfig` in `cir.algorithms`, ...); `cir.training.config` composes them into
the run's `TrainConfig`. This module only knows how to read, check and print dataclasses.

``load(TrainConfig, "run.yaml", ["algo.group_size=8", "optim.lr=2e-6"])`` reads the file,
applies the overrides (dotted paths into nested dataclasses; values parsed as YAML scalars,
so ``true``, ``1e-6``, ``[1, 2]`` and ``null`` work) and checks every key and type, naming the
offending key on error. ``to_dict`` / ``dump_yaml`` give the resolved config back, which the
trainer prints at start and saves beside the run.

Open sections. A `dict` field whose metadata holds ``{SECTIONS: registry}`` (registry: name ->
dataclass, filled in at run time) holds one typed section per registered name, read and
written as top-level keys of its dataclass: the run's config keeps the sections tasks register
there (``demo:`` in YAML, ``demo.num_heads=2`` as an override).

This module imports nothing heavy (yaml only): a config loads and fails in milliseconds.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


# Field metadata key of an open section field (see the module docstring).
SECTIONS = "cir.sections"


def _open_field(cls: type) -> dataclasses.Field | None:
    return next((f for f in dataclasses.fields(cls) if SECTIONS in f.metadata), None)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert `value` to the annotated type `tp`; `where` names the key for errors."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}={value!r}: choose one of {', '.join(map(str, allowed))}")
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=where + ".")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            # YAML reads `name=123` as an int; a string field takes its text.
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    open_field = _open_field(cls)
    sections: dict[str, type] = {}
    if open_field is not None:
        fields.pop(open_field.name)  # its sections are the keys, not its own name
        sections = open_field.metadata[SECTIONS]
    unknown = sorted(set(data) - set(fields) - set(sections))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; known under {prefix or 'top level'}: {', '.join(sorted([*fields, *sections]))}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items() if k in fields}
    if open_field is not None:
        kwargs[open_field.name] = {
            name: _coerce(data[name], section, prefix + name) if name in data else section()
            for name, section in sections.items()
        }
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # A section's own check (`__post_init__`) names its field; prefix the section.
        raise ConfigError(f"{prefix}{e}" if prefix and not str(e).startswith(prefix) else str(e)) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if SECTIONS in f.metadata:
                out.update({name: to_dict(section) for name, section in value.items()})
            else:
                out[f.name] = to_dict(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. optim.lr=1e-6)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads 1e-6 as a string; numbers written that way are meant as floats.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") and value.strip() not in ("", ".") else value
        except ValueError:
            pass
    return key.split("."), value


def _set_path(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def load(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: T | None = None,
    values: Mapping[str, Any] | None = None,
) -> T:
    """Load `cls` from `base` (or the class defaults), then a YAML file, then `values` (dotted
    key -> value, e.g. a command's flags), then ``key=value`` overrides."""
    data: dict = to_dict(base) if base is not None else to_dict(cls())
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        _merge(data, loaded)
    for key, value in (values or {}).items():
        _set_path(data, key.split("."), value)
    for item in overrides:
        keys, value = parse_override(item)
        _set_path(data, keys, value)
    return from_dict(cls, data)


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v
