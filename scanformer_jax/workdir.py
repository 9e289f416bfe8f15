"""A run directory: where its files live, and loading a trained run for inference.

A workdir holds `config.json` (the resolved experiment config), `checkpoints/` (or
`checkpoint.directory`), `metrics.jsonl` and `tensorboard/`. `eval`, `predict` and
the experiment scripts rebuild the trained model with `load_for_inference`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
from jax.sharding import Mesh

from scanformer_jax import checkpointing, config_io, sharding, train_state
from scanformer_jax.config import ExperimentConfig, MeshConfig

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"  # Written by metric_writer.MetricWriter.
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
  config = config or load_config(workdir)
  cfg = config.model
  mesh_config = mesh_config or SINGLE_DEVICE_MESH
  devices = jax.local_devices()[:1] if mesh_config == SINGLE_DEVICE_MESH else None
  mesh = sharding.make_mesh(mesh_config, devices)
  abstract = train_state.abstract_params(cfg)
  shardings = sharding.tree_shardings(abstract, mesh, mesh_config)
  ckpt = checkpointing.Checkpointer(checkpoint_dir(config, workdir), config.checkpoint,
                                    read_only=True)
  try:
    params, restored_step = ckpt.restore_params(abstract, shardings, step)
  finally:
    ckpt.close()
  return InferenceRun(config=config, params=params, step=restored_step, mesh=mesh,
                      param_shardings=shardings)
