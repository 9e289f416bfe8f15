"""Loads the `refer` toolkit's `refs(<splitBy>).p` pickles without running code.

Pickles can call any importable function while loading (e.g. `os.system`). These
files only ever hold lists / dicts of strings and numbers, so the unpickler refuses
every global except the builtin `set` / `frozenset` (Python 2 pickles name them),
refuses persistent ids, and the result is checked to contain nothing else.
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


def _check_plain(obj: Any, depth: int = 0) -> None:
  if depth > 64:
    raise UnsafePickleError("pickle nests deeper than 64 levels")
  if isinstance(obj, _SCALARS):
    return
  if isinstance(obj, dict):
    for k, v in obj.items():
      _check_plain(k, depth + 1)
      _check_plain(v, depth + 1)
  elif isinstance(obj, (list, tuple, set, frozenset)):
    for v in obj:
      _check_plain(v, depth + 1)
  else:
    raise UnsafePickleError(f"unexpected {type(obj).__name__} in pickle")


def loads(data: bytes) -> Any:
  """Unpickles `data` admitting only plain containers and scalars."""
  # Python 2 `str` objects are decoded as UTF-8 (refer's raw sentences).
  obj = _RestrictedUnpickler(io.BytesIO(data), encoding="utf-8",
                             errors="replace").load()
  _check_plain(obj)
  return obj


def load(path: str | os.PathLike) -> Any:
  with open(path, "rb") as f:
    return loads(f.read())
