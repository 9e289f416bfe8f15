"""Experiment configuration: dataclasses, `get_config()` files and `--set` overrides.

An experiment is one `ExperimentConfig` (model, data, loss, optimizer, train, eval,
checkpoint, mesh). Config files are python files whose `get_config()` returns it;
`--set section.key=value` overrides any leaf with type checking, and the resolved
config is written to `<workdir>/config.json` so `eval` and `predict` rebuild the
exact model that was trained.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import sys
import types
import typing
from typing import Any, Optional, Sequence, Union

from scanformer_jax.config import ModelConfig
from scanformer_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class ExperimentModelConfig(ModelConfig):
  """`ModelConfig` plus where its initial weights come from.

  `init_from`: a directory written by `scanformer convert-vilt` (ViLT weights for the
  backbone); None trains from scratch. `architecture()` drops it again, so jitted
  functions are keyed on the architecture only.
  """

  init_from: Optional[str] = None

  def architecture(self) -> ModelConfig:
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    return ModelConfig(**{name: getattr(self, name) for name in names})


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which dataset and how to read it (data_pipelines/pipeline.py, sources.py)."""

  # "synthetic[/<config>]", "refcoco_unc" (catalog ref_coco), "refer/refclef_berkeley",
  # ... (data_pipelines/sources.py), or "fake" (generated in memory, for tests).
  dataset: str = "synthetic"
  # Where the built TFDS datasets live (a local path or gs://...).
  data_dir: str = "~/tensorflow_datasets"
  # BERT-uncased vocab.txt; None: the synthetic dataset's own vocab.
  vocab_path: Optional[str] = None
  train_split: str = "train"
  eval_splits: tuple[str, ...] = ("validation",)
  # Training augmentation (random scale/crop, flip with left/right swap, colour jitter).
  augment: bool = True
  # grain worker processes per host (None: the pipeline's default for this machine).
  # The batch order depends on it: keep it fixed when resuming.
  worker_count: Optional[int] = None
  # Fail when more than this fraction of samples is bad (undecodable, empty, ...).
  max_bad_fraction: float = 0.01
  # Shuffling and augmentation seed.
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """DESIGN.md section 4: per-scale L1 + GIoU, keep-ratio and early-exit terms."""

  l1_weight: float = 5.0
  giou_weight: float = 2.0
  # Weight w_s of each scale's box loss; None: 1 for every scale.
  scale_weights: Optional[tuple[float, ...]] = None
  # Target fraction of patches taken at each scale (scale 0 is ignored: all taken).
  target_ratio: tuple[float, ...] = (1.0, 0.5, 0.25)
  ratio_weight: float = 2.0
  # L1 between the IoU head's prediction and the stop-gradient true IoU.
  iou_weight: float = 1.0
  # Auxiliary, not in the paper (0 = the paper's objective): binary cross-entropy
  # teaching each scale's selection logits which patches overlap the ground-truth
  # box. A dense grounding signal that speeds up training from scratch and makes
  # the scan zoom into the referred object.
  select_weight: float = 0.0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW, linear warmup then cosine decay; backbone and new parameters apart."""

  learning_rate: float = 1e-4  # New parameters: REG, scale/constant tokens, heads.
  backbone_learning_rate: float = 1e-5  # Pretrained ViLT layers and embeddings.
  warmup_steps: int = 1000
  # Learning rate at the end of the cosine, as a fraction of the peak.
  end_lr_fraction: float = 0.0
  weight_decay: float = 1e-4
  b1: float = 0.9
  b2: float = 0.999
  grad_clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  num_steps: int = 100_000
  batch_size: int = 128  # Global, over all processes and devices.
  log_every: int = 100
  seed: int = 0  # Parameter init and Gumbel noise; the data seed is data.seed.
  # Steps at the start that take every patch (no Gumbel masks): the box heads learn
  # from clean inputs while the selection head learns from loss.select_weight alone.
  # 0 (the paper) samples hard Gumbel selections from the first step.
  select_warmup_steps: int = 0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  batch_size: int = 64  # Global.
  iou_threshold: float = 0.5
  # Evaluate the validation split(s) every K training steps (0: only via `eval`).
  every_steps: int = 0
  # Early exit (early_exit.py): stop at the first scale whose predicted IoU reaches
  # this threshold; None: no early-exit report. Needs model.iou_head.
  exit_iou_threshold: Optional[float] = None
  # Ablation: replace every expression by "[CLS] [SEP]" (how much does the model
  # need the sentence?).
  blank_expressions: bool = False


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  # Where checkpoints go; None: <workdir>/checkpoints. Multi-host runs need a
  # directory every host can write, e.g. gs://bucket/runs/name/checkpoints.
  directory: Optional[str] = None
  every_steps: int = 1000
  max_to_keep: int = 3
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh `(data, fsdp)`; the batch is split over both axes.

  `data=-1` takes every device not used by `fsdp`. With `fsdp > 1`, parameters (and
  optimizer moments) of at least `fsdp_min_size` elements are sharded on their largest
  divisible axis. `distributed=True` calls `jax.distributed.initialize` (on Cloud TPU
  and SLURM it finds its peers itself; elsewhere set the three fields below).
  """

  data: int = -1
  fsdp: int = 1
  fsdp_min_size: int = 2**18
  distributed: bool = False
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  model: ExperimentModelConfig = ExperimentModelConfig()
  data: DataConfig = DataConfig()
  loss: LossConfig = LossConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  eval: EvalConfig = EvalConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  mesh: MeshConfig = MeshConfig()

  def replace(self, **changes) -> "ExperimentConfig":
    return dataclasses.replace(self, **changes)


def model_config(**fields) -> ExperimentModelConfig:
  """An `ExperimentModelConfig` from `ModelConfig`-style fields (for config files)."""
  return ExperimentModelConfig(**fields)


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
  config = module.get_config()
  if not isinstance(config, ExperimentConfig):
    raise UserError(f"{path}: get_config() must return an ExperimentConfig, "
                    f"got {type(config).__name__}")
  return config


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
  return [f.name for f in dataclasses.fields(config)]


def apply_overrides(config: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
  """Applies `section.key=value` strings; unknown keys and bad values are UserErrors."""
  for item in overrides:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep:
      raise UserError(f"--set expects key=value, got {item!r}")
    section_name, dot, field_name = key.partition(".")
    if not dot or section_name not in _section_names(config):
      raise UserError(f"unknown config key {key!r}: expected <section>.<field> with section "
                      f"one of {', '.join(_section_names(config))}")
    section = getattr(config, section_name)
    types_ = _field_types(type(section))
    if field_name not in types_:
      raise UserError(f"unknown config key {key!r}; {section_name} fields are: "
                      f"{', '.join(sorted(types_))}")
    value = coerce(_parse_literal(text.strip()), types_[field_name], key)
    try:
      section = dataclasses.replace(section, **{field_name: value})
    except (ValueError, TypeError) as e:
      raise UserError(f"invalid value for {key}: {e}") from None
    config = dataclasses.replace(config, **{section_name: section})
  return config


# ----------------------------------------------------------------------------------
# JSON round trip (<workdir>/config.json).


def to_dict(config: ExperimentConfig) -> dict[str, Any]:
  return dataclasses.asdict(config)


def from_dict(data: dict[str, Any]) -> ExperimentConfig:
  """Inverse of `to_dict`; unknown keys are errors, missing keys take defaults."""
  sections = {}
  hints = _field_types(ExperimentConfig)
  for name, values in data.items():
    if name not in hints:
      raise UserError(f"config.json: unknown section {name!r}")
    cls = hints[name]
    field_types = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
      if key not in field_types:
        raise UserError(f"config.json: unknown key {name}.{key}")
      kwargs[key] = coerce(value, field_types[key], f"{name}.{key}")
    try:
      sections[name] = cls(**kwargs)
    except (ValueError, TypeError) as e:
      raise UserError(f"config.json: invalid {name}: {e}") from None
  return ExperimentConfig(**sections)


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
  with open(path) as f:
    return from_dict(json.load(f))


def flat_items(config: ExperimentConfig) -> list[tuple[str, Any]]:
  """`[("train.num_steps", 100), ...]`: every leaf key, for docs and logging."""
  out = []
  for section in dataclasses.fields(config):
    for key, value in dataclasses.asdict(getattr(config, section.name)).items():
      out.append((f"{section.name}.{key}", value))
  return out
