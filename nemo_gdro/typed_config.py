"""Typed configuration sections: dicts from YAML -> frozen dataclasses, with errors that name the key.

:func:`build_section` checks every key of a section against the dataclass's
fields (an unknown key is an error listing the valid ones), checks and
coerces every value against the field's annotation (``int``, ``float``,
``bool``, ``str``, ``Literal[...]``, ``X | None``, ``tuple[...]``,
``dict``), then calls the dataclass, whose ``__post_init__`` checks ranges.
Booleans are never accepted as numbers (``max_steps=true`` is an error, not
one step), integers are accepted where floats are expected, and numeric
strings are not numbers.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

__all__ = ["ConfigError", "build_section", "check_keys"]


class ConfigError(ValueError):
    """A configuration problem, with the key path in the message."""


_MISSING = object()


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against annotation ``tp`` (lists become tuples); raises ConfigError naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp) or isinstance(value, bool) != any(isinstance(a, bool) for a in get_args(tp)):
            raise ConfigError(f"{key} must be one of {_type_name(tp)}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if math.isnan(float(value)):
            raise ConfigError(f"{key} must be a number, got nan")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (arg,) = get_args(tp) or (Any,)
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"typed_config: unsupported annotation {tp!r} for {key}")


def check_keys(cls: type, path: str, values: Mapping[str, Any], hints: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError if ``values`` has keys that are not fields of ``cls``.

    ``hints`` maps a retired key to a sentence saying what replaced it.
    """
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    for key in unknown:
        if hints and key in hints:
            raise ConfigError(f"{path}.{key} was removed: {hints[key]}")
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{path}.{k}' for k in unknown)}; valid keys of {path}: {', '.join(sorted(known))}"
        )


def build_section(
    cls: type,
    path: str,
    values: Mapping[str, Any] | None,
    *,
    extra: Mapping[str, Any] | None = None,
    hints: Mapping[str, str] | None = None,
    construct: bool = True,
) -> Any:
    """Instantiate dataclass ``cls`` from config ``values`` of section ``path``.

    Args:
        extra: fields supplied by the caller (not user keys), e.g. a budget
            taken from another section.
        hints: retired keys -> what to use instead (see :func:`check_keys`).
        construct: ``False`` checks keys and types only and returns ``None``
            (a section of a stage that is not selected: its ranges may depend
            on settings that only the selected stage must satisfy).
    """
    values = dict(values or {})
    check_keys(cls, path, values, hints)
    hints_by_field = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in values:
            kwargs[f.name] = _coerce(values[f.name], hints_by_field[f.name], f"{path}.{f.name}")
    kwargs.update(extra or {})
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing key(s) {', '.join(f'{path}.{k}' for k in missing)}")
    if not construct:
        return None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        message = str(err)
        raise ConfigError(message if path in message else f"{path}: {message}") from None
