"""Experiment config I/O: `get_config()` files, `--set` overrides, config.json.

An experiment is one `ExperimentConfig` (config.py). Config files are python files
whose `get_config()` returns it; `--set section.key=value` overrides any leaf with
type checking, and the resolved config is written to `<workdir>/config.json` so
`eval` and `predict` rebuild the exact model that was trained. Host-side only: no
jit-side module imports this file.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import os
import sys
import types
import typing
from typing import Any, Sequence, Union

from scanformer_jax import exit_heads, plugins, selection
from scanformer_jax.config import RENAMED_KEYS, ExperimentConfig, ModelConfig
from scanformer_jax.errors import UserError


# ----------------------------------------------------------------------------------
# Loading config files.


def load_config_module(path: str) -> types.ModuleType:
  """Imports a python config file as a module (its directory importable meanwhile)."""
  if not os.path.isfile(path):
    raise UserError(f"config file not found: {path}")
  name = "scanformer_experiment_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise UserError(f"config file {path} is not a python file")
  module = importlib.util.module_from_spec(spec)
  # Configs may import shared recipes that sit next to them.
  config_dir = os.path.dirname(os.path.abspath(path))
  sys.path.insert(0, config_dir)
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(config_dir)
  return module


def load_config_file(path: str) -> ExperimentConfig:
  """Imports a python config file and returns its `get_config()`."""
  module = load_config_module(path)
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {path} has no get_config() function")
  try:
    config = module.get_config()
  except (ValueError, UserError) as e:  # A section's validation (config.py).
    raise UserError(f"{path}: invalid config: {e}") from None
  if isinstance(config, ExperimentConfig) and config.plugins:
    # Plugin files named relative to the config file; recorded absolute in config.json.
    here = os.path.dirname(os.path.abspath(path))
    config = config.replace(plugins=tuple(plugins.resolve(p, here) for p in config.plugins))
    plugins.load_all(config.plugins)
  if not isinstance(config, ExperimentConfig):
    raise UserError(f"{path}: get_config() must return an ExperimentConfig, "
                    f"got {type(config).__name__}")
  return check_registered(config, path)


# ----------------------------------------------------------------------------------
# Typed values: `--set` strings and config.json entries become field values.


def _is_optional(tp) -> tuple[bool, Any]:
  origin = typing.get_origin(tp)
  if origin in (Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1 and len(typing.get_args(tp)) == 2:
      return True, args[0]
  return False, tp


def _parse_literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def coerce(value: Any, tp: Any, key: str) -> Any:
  """Checks (and where unambiguous converts) `value` to the annotated type `tp`."""
  optional, inner = _is_optional(tp)
  if value is None or (optional and isinstance(value, str) and value.lower() == "none"):
    if optional:
      return None
    raise UserError(f"{key} may not be None")
  tp = inner
  if typing.get_origin(tp) is tuple:
    args = typing.get_args(tp)
    if isinstance(value, str):
      value = [_parse_literal(v.strip()) for v in value.split(",") if v.strip()]
    elif not isinstance(value, (list, tuple)):
      value = [value]
    if len(args) >= 2 and args[-1] is not Ellipsis:  # A fixed-length pair, triple, ...
      if len(value) != len(args):
        raise UserError(f"{key} expects {len(args)} values, got {value!r}")
      return tuple(coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
    elem = args[0] if args else Any
    return tuple(coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
  if tp is bool:
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
      return value.lower() in ("true", "1", "yes")
    if isinstance(value, bool):
      return value
    raise UserError(f"{key} expects true/false, got {value!r}")
  if tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
    raise UserError(f"{key} expects an integer, got {value!r}")
  if tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    raise UserError(f"{key} expects a number, got {value!r}")
  if tp is str:
    return str(value)
  if tp is Any:
    return value
  raise UserError(f"{key}: unsupported field type {tp}")


def _field_types(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _section_names(config: ExperimentConfig) -> list[str]:
  """The config's sections (`model`, `data`, ...): its dataclass-valued fields."""
  return [f.name for f in dataclasses.fields(config)
          if dataclasses.is_dataclass(getattr(config, f.name))]


def _refuse_renamed(key: str) -> None:
  if key in RENAMED_KEYS:
    raise UserError(f"config key {key} was renamed: use {RENAMED_KEYS[key]}")


def check_registered(config: ExperimentConfig, where: str = "config") -> ExperimentConfig:
  """UserError unless every registry name the config uses is registered (after its
  plugins are imported): exit heads, selection rules."""
  model = config.model
  for name in model.exit_heads:
    if name not in exit_heads.names():
      raise UserError(f"{where}: model.exit_heads names {name!r}, not a registered exit head "
                      f"({', '.join(exit_heads.names())}); a plugin registers more: "
                      "--plugin FILE")
  for key, value, known, what in (
      ("select_rule", model.selection_rule, selection.RULES, "selection rule"),
      ("train_select_rule", model.train_select_rule, selection.TRAIN_RULES,
       "training selection rule")):
    if value not in known:
      raise UserError(f"{where}: model.{key}={value!r} is not a registered {what} (known: "
                      f"{', '.join(sorted(known))}); a plugin registers more: --plugin FILE")
  return config


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
  """" (did you mean 'x'?)" for the closest of `choices`, or "" when none is close."""
  close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def apply_overrides(config: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
  """Applies `section.key=value` strings; unknown keys and bad values are UserErrors.

  Each value is type-checked on its own, but a section is rebuilt (and validated) once,
  after all of its overrides: `model.hidden_size=64 model.num_heads=4` works in any order.
  """
  changes: dict[str, dict[str, Any]] = {}
  for item in overrides:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep:
      raise UserError(f"--set expects key=value, got {item!r}")
    _refuse_renamed(key)
    section_name, dot, field_name = key.partition(".")
    if not dot or section_name not in _section_names(config):
      sections = _section_names(config)
      guess = _did_you_mean(key, [f"{n}.{field_name}" for n in sections]) if dot else ""
      raise UserError(f"unknown config key {key!r}{guess}: expected <section>.<field> with "
                      f"section one of {', '.join(sections)}")
    types_ = _field_types(type(getattr(config, section_name)))
    if field_name not in types_:
      guess = _did_you_mean(key, [f"{section_name}.{n}" for n in types_])
      raise UserError(f"unknown config key {key!r}{guess}; {section_name} fields are: "
                      f"{', '.join(sorted(types_))}")
    value = coerce(_parse_literal(text.strip()), types_[field_name], key)
    changes.setdefault(section_name, {})[field_name] = value
  for section_name, fields in changes.items():
    try:
      section = dataclasses.replace(getattr(config, section_name), **fields)
    except (ValueError, TypeError) as e:
      keys = ", ".join(f"{section_name}.{name}" for name in fields)
      raise UserError(f"invalid value for {keys}: {e}") from None
    config = dataclasses.replace(config, **{section_name: section})
  return check_registered(config, "--set")


# ----------------------------------------------------------------------------------
# JSON round trip (<workdir>/config.json).


def to_dict(config: ExperimentConfig) -> dict[str, Any]:
  return dataclasses.asdict(config)


def _section_from_dict(cls, values: dict[str, Any], where: str, name: str):
  field_types = _field_types(cls)
  if not isinstance(values, dict):
    raise UserError(f"{where}: section {name!r} must be an object of fields, got "
                    f"{type(values).__name__}")
  kwargs = {}
  for key, value in values.items():
    _refuse_renamed(f"{name}.{key}")
    if key not in field_types:
      guess = _did_you_mean(key, list(field_types))
      raise UserError(f"{where}: unknown key {name}.{key}{guess}")
    kwargs[key] = coerce(value, field_types[key], f"{name}.{key}")
  try:
    return cls(**kwargs)
  except (ValueError, TypeError) as e:
    raise UserError(f"{where}: invalid {name}: {e}") from None


def from_dict(data: dict[str, Any], where: str = "config.json") -> ExperimentConfig:
  """Inverse of `to_dict`; unknown keys are errors, missing keys take defaults."""
  sections = {}
  hints = _field_types(ExperimentConfig)
  if not isinstance(data, dict):
    raise UserError(f"{where}: expected an object of config sections, got a "
                    f"{type(data).__name__}")
  plugin_specs = coerce(data.get("plugins", ()), hints["plugins"], "plugins")
  plugins.load_all(plugin_specs)  # Before the sections: they may name what plugins register.
  for name, values in data.items():
    if name == "plugins":
      continue
    if name not in hints:
      raise UserError(f"{where}: unknown section {name!r}{_did_you_mean(name, list(hints))}")
    sections[name] = _section_from_dict(hints[name], values, where, name)
  return check_registered(ExperimentConfig(plugins=plugin_specs, **sections), where)


def model_config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
  """A `ModelConfig` as JSON-able fields (the `model` section of config.json)."""
  return dataclasses.asdict(cfg)


def model_config_from_dict(data: dict[str, Any], where: str = "config.json") -> ModelConfig:
  """Inverse of `model_config_to_dict`: typed, unknown keys rejected, missing keys default."""
  return _section_from_dict(ModelConfig, data, where, "model")


def save_json(config: ExperimentConfig, path: str) -> None:
  """Writes atomically: a reader (another host, a killed run) never sees half a file."""
  partial = f"{path}.partial"
  with open(partial, "w") as f:
    json.dump(to_dict(config), f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(partial, path)


def load_json(path: str) -> ExperimentConfig:
  if not os.path.isfile(path):
    raise UserError(f"no config.json at {path}: is this a training workdir? "
                    "(pass --config to name the experiment explicitly)")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path} is unreadable or not JSON ({type(e).__name__}: {e}); it is the "
                    "run's resolved config: restore it, or delete it and pass --config with the "
                    "experiment file (the checkpoints are untouched)") from None
  return from_dict(data, path)


def flat_items(config: ExperimentConfig) -> list[tuple[str, Any]]:
  """`[("train.num_steps", 100), ...]`: every leaf key, for docs and logging."""
  out = []
  for section in _section_names(config):
    for key, value in dataclasses.asdict(getattr(config, section)).items():
      out.append((f"{section}.{key}", value))
  out.append(("plugins", config.plugins))
  return out
