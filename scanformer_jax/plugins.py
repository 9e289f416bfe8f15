"""Plugins: a fork's own file or module, imported before a command runs.

A plugin registers what the library looks up by name: exit criteria
(`early_exit.register`), selection rules (`selection.rule`, `selection.train_rule`),
exit heads (`exit_heads.register`) and datasets (`data_source.register`). Name it with
`--plugin PATH_OR_MODULE` on any `scanformer` command, or in an experiment config's
`plugins=(...)`; the training run records it in config.json, so `eval`, `predict` and
`calibrate` on that workdir import it again. Paths are recorded absolute.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import types
from typing import Iterable

from scanformer_jax.errors import UserError

_LOADED: dict[str, types.ModuleType] = {}


def is_path(spec: str) -> bool:
  return spec.endswith(".py") or os.sep in spec


def resolve(spec: str, base: str | None = None) -> str:
  """A path spec made absolute (against `base`, default the working directory);
  a module name as it is."""
  if not is_path(spec):
    return spec
  path = os.path.expanduser(spec)
  if not os.path.isabs(path):
    path = os.path.join(base or os.getcwd(), path)
  return os.path.normpath(path)


def _import_file(path: str) -> types.ModuleType:
  if not os.path.isfile(path):
    raise UserError(f"plugin {path}: no such file")
  digest = hashlib.sha1(path.encode()).hexdigest()[:8]
  name = f"scanformer_plugin_{os.path.splitext(os.path.basename(path))[0]}_{digest}"
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise UserError(f"plugin {path} is not a python file")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]
    raise
  return module


def load(spec: str) -> types.ModuleType:
  """Imports one plugin (once per process); a missing or failing one is one UserError."""
  key = resolve(spec)
  if key in _LOADED:
    return _LOADED[key]
  try:
    module = _import_file(key) if is_path(key) else importlib.import_module(key)
  except UserError:
    raise
  except ModuleNotFoundError as e:
    if not is_path(key) and e.name == key.split(".")[0]:
      raise UserError(f"plugin {spec}: no module named {key!r} (a file needs a .py path)"
                      ) from None
    raise UserError(f"plugin {spec} failed to import: {type(e).__name__}: {e}") from None
  except Exception as e:  # The plugin's own error: name the plugin, in one line.
    raise UserError(f"plugin {spec} failed to import: {type(e).__name__}: {e}") from None
  _LOADED[key] = module
  return module


def load_all(specs: Iterable[str]) -> None:
  for spec in specs:
    load(spec)
