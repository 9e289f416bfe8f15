"""A run directory: where its files live, and loading a trained run for inference.

A workdir holds `config.json` (the resolved experiment config), `checkpoints/` (or
`checkpoint.directory`), `metrics.jsonl`, `tensorboard/` and, when the run has a
vocab file, `vocab.txt` (`bundle_vocab`), so that it predicts wherever it is moved.
`eval`, `predict` and the experiment scripts rebuild the trained model with
`load_for_inference`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from scanformer_jax import checkpointing, compile_cache, config_io, sharding, train_state
from scanformer_jax.config import ExperimentConfig, MeshConfig, ModelConfig

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"  # Written by metric_writer.MetricWriter.
VOCAB_FILE = "vocab.txt"  # The run's own copy of data.vocab_path.
# One sample at a time: one device (orbax reshards FSDP checkpoints on restore).
SINGLE_DEVICE_MESH = MeshConfig(data=1, fsdp=1)


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def checkpoint_dir(config: ExperimentConfig, workdir: str) -> str:
  """`checkpoint.directory`, or `<workdir>/checkpoints` when unset."""
  if config.checkpoint.directory:
    return os.path.expanduser(config.checkpoint.directory)
  return os.path.join(workdir, CHECKPOINTS_DIR)


def metrics_path(workdir: str) -> str:
  return os.path.join(workdir, METRICS_FILE)


def load_config(workdir: str) -> ExperimentConfig:
  """The config a run was trained with (`<workdir>/config.json`)."""
  return config_io.load_json(config_path(workdir))


def bundle_vocab(config: ExperimentConfig, workdir: str) -> Optional[str]:
  """Copies `data.vocab_path` into `<workdir>/vocab.txt`; returns the copy's path.

  With it the workdir holds all that inference needs, and can be moved or shared.
  """
  src = config.data.vocab_path and os.path.expanduser(config.data.vocab_path)
  if not src or not os.path.isfile(src):
    return None
  dst = os.path.join(workdir, VOCAB_FILE)
  if not (os.path.isfile(dst) and os.path.samefile(src, dst)):
    os.makedirs(workdir, exist_ok=True)
    shutil.copyfile(src, dst + ".tmp")
    os.replace(dst + ".tmp", dst)
  return dst


def relocated(config: ExperimentConfig, workdir: str) -> ExperimentConfig:
  """The config with a vocab path that exists: `data.vocab_path` as given when it is
  a file from here, else the workdir's own `vocab.txt` (a moved or copied run)."""
  path = config.data.vocab_path
  bundled = os.path.join(workdir, VOCAB_FILE)
  if path and not os.path.isfile(os.path.expanduser(path)) and os.path.isfile(bundled):
    return config.replace(data=dataclasses.replace(config.data,
                                                   vocab_path=os.path.abspath(bundled)))
  return config


def registry_objects(cfg: ModelConfig) -> list[Any]:
  """What the model's registry names (selection rules, exit heads) run: their code
  is part of every cached trace (`compile_cache.cache_key`)."""
  from scanformer_jax import exit_heads, selection  # pylint: disable=g-import-not-at-top
  objects = [selection.RULES.get(cfg.selection_rule),
             selection.TRAIN_RULES.get(cfg.train_select_rule)]
  for name in cfg.exit_heads:
    head = exit_heads.get(name)
    objects += [head.module, head.to_signal]
  return [o for o in objects if o is not None]


def _shapes_to_json(tree: Any) -> Optional[Any]:
  """A nested dict of ShapeDtypeStructs as JSON-able {key: ... [shape, dtype]}; None
  for any other structure (not cached)."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      child = _shapes_to_json(v)
      if not isinstance(k, str) or child is None:
        return None
      out[k] = child
    return out
  if isinstance(tree, jax.ShapeDtypeStruct):
    return [list(tree.shape), str(tree.dtype)]
  return None


def _shapes_from_json(data: Any) -> Any:
  if isinstance(data, dict):
    return {k: _shapes_from_json(v) for k, v in data.items()}
  shape, dtype = data
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def abstract_params(cfg: ModelConfig) -> Any:
  """`train_state.abstract_params(cfg)` (tracing the model's init), kept between
  processes in `compile_cache`'s program cache: a second start skips the trace."""
  key = compile_cache.cache_key("params", {"model": config_io.model_config_to_dict(cfg)},
                                registry_objects(cfg))
  blob = compile_cache.load_blob(key)
  if blob is not None:
    try:
      return _shapes_from_json(json.loads(blob))
    except (ValueError, TypeError, KeyError):  # A damaged entry: trace again.
      pass
  abstract = train_state.abstract_params(cfg)
  data = _shapes_to_json(abstract)
  if data is not None:
    compile_cache.store_blob(key, json.dumps(data).encode())
  return abstract


@dataclasses.dataclass(frozen=True)
class InferenceRun:
  """A trained run's parameters, placed on `mesh`, ready for `ScanFormer.apply`."""

  config: ExperimentConfig
  params: Any
  step: int  # The checkpoint's training step.
  mesh: Mesh
  param_shardings: Any


def load_for_inference(workdir: str, config: Optional[ExperimentConfig] = None,
                       step: Optional[int] = None,
                       mesh_config: Optional[MeshConfig] = None) -> InferenceRun:
  """Restores the params of checkpoint `step` (default: newest) of `workdir`.

  config: default `<workdir>/config.json`. mesh_config: default a single-device mesh
  (one sample at a time); `eval` passes `config.mesh` to use every device.
  """
  config = relocated(config or load_config(workdir), workdir)
  cfg = config.model
  mesh_config = mesh_config or SINGLE_DEVICE_MESH
  devices = jax.local_devices()[:1] if mesh_config == SINGLE_DEVICE_MESH else None
  mesh = sharding.make_mesh(mesh_config, devices)
  abstract = abstract_params(cfg)
  shardings = sharding.tree_shardings(abstract, mesh, mesh_config)
  ckpt = checkpointing.Checkpointer(checkpoint_dir(config, workdir), config.checkpoint,
                                    read_only=True)
  try:
    params, restored_step = ckpt.restore_params(abstract, shardings, step)
  finally:
    ckpt.close()
  return InferenceRun(config=config, params=params, step=restored_step, mesh=mesh,
                      param_shardings=shardings)
