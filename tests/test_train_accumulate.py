"""Gradient accumulation, uint8 images and the warm-up program of the train step.

`train.microbatches = N` must give the N = 1 update (the Gumbel noise of a row does
not depend on N); a uint8 image batch normalised in the step must give the float32
batch's step; the warm-up must be its own program, leaving the Gumbel step's memory
as without warm-up.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

import fake_data
import train_helpers
from data_pipelines import transforms
from data_pipelines.contract import DEVICE_KEYS
from scanformer_jax import config_io, optim, pixels, sharding, train_state, train_step
from scanformer_jax.config import MeshConfig, OptimConfig
from scanformer_jax.errors import UserError

B = 4


@pytest.fixture(scope="module")
def setup():
  config = config_io.load_config_file(train_helpers.FAKE_CONFIG)
  config = config.replace(optim=OptimConfig(learning_rate=1e-2, warmup_steps=0),
                          train=dataclasses.replace(config.train, batch_size=B))
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  return config, mesh


def _step(config, mesh, batch_shards=1, **train):
  cfg = config.model
  tc = dataclasses.replace(config.train, **train)
  tx, schedules = optim.make_optimizer(config.optim, tc.num_steps)
  shardings = train_state.state_shardings(cfg, tx, mesh, config.mesh)
  step = train_step.jit_train_step(
      train_step.make_train_step(cfg, config.loss, tx, schedules, tc, batch_shards),
      shardings, mesh)
  return step, train_state.create_train_state(cfg, tx, 0, mesh, config.mesh)


def _batch(config, valid=(True,) * B):
  cfg = config.model
  rows = [fake_data.make_example(0, i, cfg.image_size, cfg.max_text_len) for i in range(B)]
  batch = {k: np.stack([r[k] for r in rows]) for k in DEVICE_KEYS}
  batch["valid"] = np.asarray(valid)
  return batch


def _params(state):
  return jax.tree.map(np.asarray, state.params)


def test_microbatches_give_the_one_batch_update(setup):
  config, mesh = setup
  batch = _batch(config, valid=(True, False, True, True))  # Unequal microbatch shares.
  results = {}
  for n in (1, 2):
    # batch_shards=2: the device-local split layout, rows 0,2 | 1,3.
    step, state = _step(config, mesh, batch_shards=2, microbatches=n)
    state, metrics = step(state, sharding.to_global(batch, mesh))
    results[n] = (jax.tree.map(float, sharding.fetch(metrics)), _params(state))
  (m1, p1), (m2, p2) = results[1], results[2]
  for key in ("loss", "l1", "giou", "ratio", "keep_s1", "iou_s1", "grad_norm"):
    np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert train_helpers.max_abs_diff(p1, _params(_step(config, mesh)[1])) > 1e-4  # It moved.
  assert train_helpers.max_abs_diff(p1, p2) < 1e-5


def test_microbatches_must_divide_the_batch(setup):
  config, _ = setup
  tx, schedules = optim.make_optimizer(config.optim, 10)
  tc = dataclasses.replace(config.train, batch_size=6, microbatches=2)
  with pytest.raises(UserError, match=r"train.batch_size 6 must be divisible by "
                                      r"train.microbatches x devices = 2 x 2"):
    train_step.make_train_step(config.model, config.loss, tx, schedules, tc, batch_shards=2)


def test_split_keeps_each_devices_rows_on_it():
  rows = np.arange(8)
  pieces = np.asarray(train_step.split_microbatches(rows, 2, 2))
  # Device 0 holds rows 0-3, device 1 rows 4-7; each microbatch takes half of each.
  np.testing.assert_array_equal(pieces, [[0, 1, 4, 5], [2, 3, 6, 7]])


def test_uint8_images_give_the_float32_step(setup):
  config, mesh = setup
  r = config.model.image_size
  rng = np.random.default_rng(0)
  hw = np.array([[r, r], [r // 2, r], [r, 20], [7, 9]], np.int32)
  content = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in hw]
  floats = _batch(config)
  floats["image"] = np.stack([transforms.to_frame(c, r) for c in content])
  raw = dict(floats, content_hw=hw)
  raw["image"] = np.zeros((B, r, r, 3), np.uint8)
  for i, c in enumerate(content):
    raw["image"][i, :c.shape[0], :c.shape[1]] = c
    raw["image"][i, c.shape[0]:, :] = 200  # Outside the content: ignored.
  np.testing.assert_array_equal(
      np.asarray(pixels.normalize(raw["image"], hw)), floats["image"])
  outs = []
  for batch in (floats, raw):
    step, state = _step(config, mesh)
    state, metrics = step(state, sharding.to_global(batch, mesh))
    outs.append((jax.tree.map(float, sharding.fetch(metrics)), _params(state)))
  for key in ("loss", "grad_norm", "keep_s1"):
    np.testing.assert_allclose(outs[1][0][key], outs[0][0][key], rtol=1e-6, err_msg=key)
  assert train_helpers.max_abs_diff(outs[0][1], outs[1][1]) < 1e-6


def test_warmup_leaves_the_gumbel_step_memory_unchanged(setup):
  """The warm-up is a second program: the Gumbel (sparse) step's temp bytes are those
  of a run without warm-up (one program with both branches held both residuals)."""
  config, mesh = setup
  batch = sharding.to_global(_batch(config), mesh)
  temp = {}
  for warmup in (0, 3):
    step, state = _step(config, mesh, path="sparse", slots=(4, 8),
                        select_warmup_steps=warmup)
    compiled = step.lower(state, batch).compile()
    temp[warmup] = compiled.memory_analysis().temp_size_in_bytes
    assert step.program(warmup) is step.main
    assert (step.warmup is None) == (warmup == 0)
    assert warmup == 0 or step.program(warmup - 1) is step.warmup
  assert temp[3] == temp[0] > 0


SHARDED = r"""
import dataclasses, json, sys, jax, numpy as np
sys.path.insert(0, %(tests)r)
import fake_data
from data_pipelines.contract import DEVICE_KEYS
from scanformer_jax import config_io, optim, sharding, train_state, train_step
from scanformer_jax.config import MeshConfig, OptimConfig
config = config_io.load_config_file(%(config)r)
config = config.replace(optim=OptimConfig(learning_rate=1e-2, warmup_steps=0))
cfg = config.model
rows = [fake_data.make_example(0, i, cfg.image_size, cfg.max_text_len) for i in range(4)]
batch = {k: np.stack([r[k] for r in rows]) for k in DEVICE_KEYS}
out = {}
for name, n, devices in [("one", 1, jax.devices()[:1]), ("two", 2, None)]:
  mesh = sharding.make_mesh(MeshConfig(data=-1), devices)
  tc = dataclasses.replace(config.train, batch_size=4, microbatches=n)
  tx, schedules = optim.make_optimizer(config.optim, tc.num_steps)
  shardings = train_state.state_shardings(cfg, tx, mesh, config.mesh)
  step = train_step.jit_train_step(train_step.make_train_step(
      cfg, config.loss, tx, schedules, tc, mesh.size), shardings, mesh)
  state = train_state.create_train_state(cfg, tx, 0, mesh, config.mesh)
  compiled = step.lower(state, sharding.to_global(batch, mesh)).compile()
  hlo = compiled.as_text()
  state, metrics = compiled(state, sharding.to_global(batch, mesh))
  out[name] = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
               "moved": [c for c in ("all-to-all", "collective-permute", "all-gather")
                         if c in hlo]}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_microbatches_on_two_devices_stay_local_and_match_one_device():
  """2 faked devices x 2 microbatches: no row moves between devices (gradients are
  all-reduced, nothing else), and the step equals one device without accumulation."""
  proc = train_helpers.run_python(
      SHARDED % {"config": train_helpers.FAKE_CONFIG, "tests": train_helpers.TESTS},
      extra_env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, timeout=600)
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  out = json.loads(line[len("RESULT"):])
  assert out["two"]["moved"] == []
  for key in ("loss", "grad_norm"):
    assert out["two"][key] == pytest.approx(out["one"][key], rel=1e-5)
