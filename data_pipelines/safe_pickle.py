"""Loads the `refer` toolkit's `refs(<splitBy>).p` pickles without running code.

Pickles can call any importable function while loading (e.g. `os.system`). These
files only ever hold lists / dicts of strings and numbers, so the unpickler refuses
every global except the builtin `set` / `frozenset` (Python 2 pickles name them),
refuses persistent ids, and the result is checked to contain nothing else, each
object once, so a small pickle of shared references is checked in linear time.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

_ALLOWED_GLOBALS = {("builtins", "set"), ("builtins", "frozenset"),
                    ("__builtin__", "set"), ("__builtin__", "frozenset")}
_SCALARS = (str, bytes, int, float, bool, complex, type(None))


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle wanted something other than plain containers and scalars."""


class _RestrictedUnpickler(pickle.Unpickler):

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_GLOBALS:
      return set if name == "set" else frozenset
    raise UnsafePickleError(
        f"refusing to load global {module}.{name}: refer pickles may only contain "
        "plain containers (list, dict, tuple, set) and scalars")

  def persistent_load(self, pid: Any) -> Any:
    raise UnsafePickleError("refusing persistent id in pickle")


_MAX_DEPTH = 64


def _check_plain(root: Any, max_visits: int) -> None:
  """Raises unless `root` holds only plain containers and scalars.

  Each container is checked once (memo by id): a pickle's memo lets a few bytes name
  the same object many times, so walking every path could take exponential time.
  With the memo the work is one visit per reference the pickle stored; more than
  `max_visits` (a multiple of the pickle's size) is refused.
  """
  seen: set[int] = set()
  visits = 0
  stack = [(root, 0)]
  while stack:
    obj, depth = stack.pop()
    visits += 1
    if visits > max_visits:
      raise UnsafePickleError(f"pickle holds more than {max_visits} references for its size")
    if isinstance(obj, _SCALARS):
      continue
    if depth > _MAX_DEPTH:
      raise UnsafePickleError(f"pickle nests deeper than {_MAX_DEPTH} levels")
    if id(obj) in seen:
      continue
    if isinstance(obj, dict):
      seen.add(id(obj))
      stack.extend((item, depth + 1) for pair in obj.items() for item in pair)
    elif isinstance(obj, (list, tuple, set, frozenset)):
      seen.add(id(obj))
      stack.extend((item, depth + 1) for item in obj)
    else:
      raise UnsafePickleError(f"unexpected {type(obj).__name__} in pickle")


def loads(data: bytes) -> Any:
  """Unpickles `data` admitting only plain containers and scalars."""
  # Python 2 `str` objects are decoded as UTF-8 (refer's raw sentences).
  obj = _RestrictedUnpickler(io.BytesIO(data), encoding="utf-8",
                             errors="replace").load()
  # Each reference a plain pickle stores took at least one opcode byte to push.
  _check_plain(obj, max_visits=4 * len(data) + 1024)
  return obj


def load(path: str | os.PathLike) -> Any:
  with open(path, "rb") as f:
    return loads(f.read())
