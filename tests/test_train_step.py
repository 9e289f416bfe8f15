"""The jitted train step: a non-finite batch is skipped and counted, training goes on."""

import dataclasses

import jax
import numpy as np
import pytest
from data_pipelines.contract import DEVICE_KEYS

import fake_data
import train_helpers
from scanformer_jax import config_io, optim, sharding, train_state, train_step
from scanformer_jax.config import MeshConfig


def _step_and_state(config, mesh, select_warmup_steps=0, path="dense"):
  """A jitted train step and a fresh state for `config` on `mesh`."""
  cfg = config.model
  tx, schedules = optim.make_optimizer(config.optim, config.train.num_steps)
  shardings = train_state.state_shardings(cfg, tx, mesh, config.mesh)
  step = train_step.jit_train_step(
      train_step.make_train_step(
          cfg, config.loss, tx, schedules,
          dataclasses.replace(config.train, select_warmup_steps=select_warmup_steps,
                              path=path)),
      shardings, mesh)
  return step, train_state.create_train_state(cfg, tx, 0, mesh, config.mesh)


@pytest.fixture(scope="module")
def setup():
  config = config_io.load_config_file(train_helpers.FAKE_CONFIG)
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  step, state = _step_and_state(config, mesh)
  return config, mesh, step, state


def _batch(config, start=0):
  rows = [fake_data.make_example(0, i, config.model.image_size, config.model.max_text_len)
          for i in range(start, start + config.train.batch_size)]
  return {k: np.stack([r[k] for r in rows]) for k in DEVICE_KEYS}


def test_nan_batch_is_skipped_and_counted(setup):
  config, mesh, step, state = setup
  before = jax.tree.map(np.asarray, state.params)
  bad = _batch(config)
  bad["image"][3, 5, 5, 0] = np.nan
  state, metrics = step(state, sharding.to_global(bad, mesh))
  assert int(metrics["finite"]) == 0 and int(metrics["skipped"]) == 1
  assert not np.isfinite(float(metrics["loss"]))
  assert int(state.step) == 1
  after = jax.tree.map(np.asarray, state.params)
  assert train_helpers.max_abs_diff(before, after) == 0.0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.opt_state)
             if np.issubdtype(np.asarray(x).dtype, np.floating))

  # The next, finite batches train normally (the first optimizer step has warmup
  # learning rate 0, so take two); the count stays.
  for start in (8, 16):
    state, metrics = step(state, sharding.to_global(_batch(config, start), mesh))
  assert int(metrics["finite"]) == 1 and int(metrics["skipped"]) == 1
  assert np.isfinite(float(metrics["loss"]))
  assert train_helpers.max_abs_diff(after, jax.tree.map(np.asarray, state.params)) > 0
  assert int(state.step) == 3
  for key in ("l1", "giou", "ratio", "lr", "lr_backbone", "keep_s1", "grad_norm"):
    assert key in metrics


def test_select_warmup_takes_every_patch_then_gumbel(setup):
  """During select_warmup_steps every patch is taken; afterwards Gumbel drops some."""
  config, mesh, _, _ = setup
  cfg = config.model
  step, state = _step_and_state(config, mesh, select_warmup_steps=2)
  keeps = []
  for start in (0, 8, 16):
    state, metrics = step(state, sharding.to_global(_batch(config, start), mesh))
    keeps.append([float(metrics[f"keep_s{s}"]) for s in range(1, cfg.num_scales)])
  assert keeps[0] == keeps[1] == [1.0] * (cfg.num_scales - 1)
  # Random init: logits near 0, so hard Gumbel decisions drop about half the patches.
  assert all(k < 0.9 for k in keeps[2]), keeps
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 3


def test_sparse_path_skips_a_nan_batch_and_reports_drops(setup):
  """train.path=sparse keeps the guard: a non-finite batch changes nothing, then it trains."""
  config, mesh, _, _ = setup
  # Capacity 4 of 16 at scale 1: random-init Gumbel takes about 8, so some are dropped.
  config = config.replace(train=dataclasses.replace(config.train, slots=(4, 4)))
  step, state = _step_and_state(config, mesh, path="sparse")
  before = jax.tree.map(np.asarray, state.params)
  bad = _batch(config)
  bad["image"][0, 1, 1, 2] = np.inf
  state, metrics = step(state, sharding.to_global(bad, mesh))
  assert int(metrics["finite"]) == 0 and int(metrics["skipped"]) == 1
  assert train_helpers.max_abs_diff(before, jax.tree.map(np.asarray, state.params)) == 0.0
  for start in (8, 16):
    state, metrics = step(state, sharding.to_global(_batch(config, start), mesh))
  assert int(metrics["finite"]) == 1 and int(metrics["skipped"]) == 1
  assert train_helpers.max_abs_diff(before, jax.tree.map(np.asarray, state.params)) > 0
  assert float(metrics["keep_s1"]) <= 4 / 16 and float(metrics["dropped_s1"]) > 0
