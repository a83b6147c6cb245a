"""The config edge: a section of an experiment config -> a frozen, typed dataclass.

Every section of ``experiments/configs/*.py`` (``data``, ``train``, ``sharding``,
``init``, the task's options, ...) is a frozen dataclass that owns its fields and their
defaults. :func:`parse` turns a section (a ``ConfigDict`` or a dict) into one, once, at
the edge; a wrong key or value raises a ``ValueError`` that names the full path
(``train.log_every='5' must be an int``). Library code after the edge reads attributes,
never ``.get`` on a section.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def plain(value: Any) -> Any:
  """A ``ConfigDict`` / mapping as nested plain dicts (field references resolved)."""
  if hasattr(value, "to_dict") and not dataclasses.is_dataclass(value):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: plain(v) for k, v in value.items()}
  return value


def _describe(kind: Any) -> str:
  if kind is type(None):
    return "None"
  origin = typing.get_origin(kind)
  if origin in (typing.Union, types.UnionType):
    return " or ".join(_describe(a) for a in typing.get_args(kind))
  if origin is tuple:
    return f"a tuple of {_describe(typing.get_args(kind)[0])}"
  if origin is not None:
    return getattr(origin, "__name__", str(kind))
  return {int: "an int", float: "a number", bool: "a bool", str: "a string"}.get(
      kind, getattr(kind, "__name__", str(kind)))


def _convert(value: Any, kind: Any) -> tuple[bool, Any]:
  """``(ok, value as kind)``: ints are numbers, lists are tuples, mappings dicts."""
  if kind is Any:
    return True, value
  if kind is type(None):
    return value is None, value
  origin = typing.get_origin(kind)
  if origin in (typing.Union, types.UnionType):
    for arg in typing.get_args(kind):
      ok, out = _convert(value, arg)
      if ok:
        return True, out
    return False, value
  if origin is tuple:
    if isinstance(value, (str, bytes, Mapping)):
      return False, value
    try:
      items = tuple(value)
    except TypeError:
      return False, value
    args = typing.get_args(kind)
    inner = args[0] if args else Any
    out = []
    for item in items:
      ok, item = _convert(item, inner)
      if not ok:
        return False, value
      out.append(item)
    return True, tuple(out)
  if origin is not None and issubclass(origin, Mapping) or kind is dict:
    return isinstance(value, Mapping), dict(value) if isinstance(value, Mapping) else value
  if kind is bool:
    return isinstance(value, bool), value
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool), value
  if kind is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return ok, float(value) if ok else value
  if kind is str:
    return isinstance(value, str), value
  return isinstance(value, kind), value


def parse(cls: type[T], section: Any, path: str, *, ignore: tuple[str, ...] = ()
          ) -> T:
  """``section`` as a ``cls`` (frozen dataclass), every field checked against its type.

  Args:
    cls: the section's dataclass; fields left out take its defaults.
    section: a ``ConfigDict``, a mapping, None (all defaults) or already a ``cls``.
    path: where ``section`` sits in the experiment config (``"train"``), for errors.
    ignore: keys that are accepted and dropped (read by someone else).
  Raises:
    ValueError: an unknown key, a missing required field or a value of the wrong type,
      naming ``path.field``; ``cls.__post_init__`` checks the values.
  """
  if isinstance(section, cls):
    return section
  if dataclasses.is_dataclass(section) and not isinstance(section, type):
    section = as_dict(section)   # another section type: its fields, checked again
  if section is not None and not isinstance(section, Mapping) and not hasattr(
      section, "to_dict"):
    raise ValueError(f"{path}={section!r} must be a mapping of {cls.__name__} fields")
  values = {k: v for k, v in plain(section or {}).items() if k not in ignore}
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f"{path}.{unknown[0]} is not a field of {path} (unknown: "
                     f"{unknown}); valid: {sorted(fields)}")
  for name, field in fields.items():
    if name not in values:
      if (field.default is dataclasses.MISSING
          and field.default_factory is dataclasses.MISSING):
        raise ValueError(f"{path}.{name} is missing")
      continue
    ok, values[name] = _convert(values[name], hints[name])
    if not ok:
      raise ValueError(f"{path}.{name}={values[name]!r} must be "
                       f"{_describe(hints[name])}")
  return cls(**values)


def check_positive(owner: Any, path: str, *names: str) -> None:
  """ValueError ``path.name=value must be an int >= 1`` for the first bad field (None
  is allowed: an unused field)."""
  for name in names:
    value = getattr(owner, name)
    if value is not None and value < 1:
      raise ValueError(f"{path}.{name}={value!r} must be an int >= 1")


def as_dict(section: Any) -> dict[str, Any]:
  """A parsed section as a plain dict (tuples kept)."""
  return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
