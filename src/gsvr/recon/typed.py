"""Typed construction of nested frozen dataclasses from plain (YAML) values, and merging of such values.

Sections are dataclass fields (``Optional`` where a section may be null); scalars are checked against
their annotation (an int is accepted for a float, lists become tuples, non-finite numbers are refused).
Every message names the setting's full dotted path.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from gsvr.errors import GsvrError


def read_yaml(path: str | Path) -> dict:
    """The mapping in a reconstruction config file (a one-line error naming the file otherwise)."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.MarkedYAMLError as exc:  # its text spans several lines: say where and what, on one
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise GsvrError(f"{path}: reconstruction config is not valid YAML ({where}{exc.problem or exc.context})") from exc
    except (OSError, yaml.YAMLError) as exc:
        raise GsvrError(f"{path}: cannot read reconstruction config ({' '.join(str(exc).split())})") from exc
    except UnicodeDecodeError as exc:
        raise GsvrError(f"{path}: reconstruction config is not a text file ({exc.reason} at byte {exc.start})") from exc
    if not isinstance(values, dict):
        raise GsvrError(f"{path}: reconstruction config must be a mapping of section: settings")
    return values


def merge(base: dict, changes: Mapping[str, Any]) -> dict:
    """``base`` with ``changes`` merged section by section; a dotted key names a nested setting."""
    out = dict(base)
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            value = {rest: value}
        if isinstance(value, Mapping):  # a section: merged into what is there (a null section starts empty)
            out[head] = merge(out[head] if isinstance(out.get(head), Mapping) else {}, value)
        else:
            out[head] = value
    return out


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def type_hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def section_type(hint: Any) -> type | None:
    """The dataclass of a (possibly Optional) section annotation, else None."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if is_optional(hint) else [hint]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def build(cls: type, values: Mapping[str, Any], source: str, prefix: str):
    hints = type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise GsvrError(f"{source}: unknown setting(s) {', '.join(prefix + u for u in unknown)}; "
                        f"{prefix.rstrip('.') or 'top level'} has {', '.join(sorted(known))}")
    typed = {}
    for name, value in values.items():
        path, hint = prefix + name, hints[name]
        section = section_type(hint)
        if value is None:
            if not is_optional(hint):
                raise GsvrError(f"{source}: {path} cannot be null")
            typed[name] = None
        elif section is not None:
            if not isinstance(value, Mapping):
                raise GsvrError(f"{source}: {path} is a section: give a mapping of its settings ({{}} for its defaults)"
                                + (" or null to switch it off" if is_optional(hint) else "") + f", got {value!r}")
            typed[name] = build(section, value, source, path + ".")
        else:
            typed[name] = _scalar(value, hint, known[name].default, source, path)
    return cls(**typed)


def _scalar(value: Any, hint: Any, default: Any, source: str, path: str) -> Any:
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] if is_optional(hint) else [hint]
    kind = kinds[0]
    origin = typing.get_origin(kind) or kind
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise GsvrError(f"{source}: {path} must be a list, got {value!r}")
        is_float = path.endswith("_mm") or any(isinstance(v, float) for v in (default or ()))
        value = tuple(float(v) if is_float and is_number(v) else v for v in value)
        if any(isinstance(v, float) and not math.isfinite(v) for v in value):
            raise GsvrError(f"{source}: {path} must hold finite numbers, got {value!r}")
        return value
    if origin is float and is_integer(value):
        value = float(value)
    if origin is float and isinstance(value, float) and not math.isfinite(value):
        raise GsvrError(f"{source}: {path} must be a finite number, got {value!r}")
    if not isinstance(value, origin) or (origin is int and isinstance(value, bool)):
        raise GsvrError(f"{source}: {path} must be {origin.__name__}, got {value!r}")
    return value
