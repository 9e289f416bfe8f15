"""Sparse training (model.py `_scan_sparse_train`) has the dense path's loss and gradients.

One tiny three-scale model (so that replaced patches have children and later scales
attend to merged tokens) with an IoU head and the selection loss on, so that every
parameter gets a gradient. Same Gumbel noise in both paths.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scanformer_jax import (bench, flops, losses, optim, selection, sharding, train_state,
                            train_step)
from scanformer_jax.config import (ExperimentConfig, LossConfig, MeshConfig, ModelConfig,
                                   OptimConfig, TrainConfig)
from scanformer_jax.errors import UserError
from scanformer_jax.model import ScanFormer, ScanFormerOutput
from scanformer_jax.pyramid import build_pyramid

CFG = ModelConfig(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2, encoder1_layers=1,
                  image_sizes=(16, 32, 64), patch_size=8, pos_grid_size=4, max_text_len=6,
                  vocab_size=40, box_head_layers=2, exit_heads=("iou",))  # 4, 16, 64 patches
LOSS = LossConfig(target_ratio=(1.0, 0.5, 0.25), select_weight=1.0)
B, L = 4, 6
# Below what Gumbel takes at random init (about half the children of taken parents):
# patches are dropped at scale 1 and slots are left empty or dropped at scale 2.
SMALL_CAPACITY = (4, 5, 12)
RTOL = 1e-4
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _batch(seed=0, batch=B):
  keys = jax.random.split(jax.random.key(seed), 4)
  centre = jax.random.uniform(keys[2], (batch, 2), minval=0.3, maxval=0.7)
  size = jax.random.uniform(keys[3], (batch, 2), minval=0.1, maxval=0.4)
  return {"image": jax.random.uniform(keys[0], (batch, CFG.image_size, CFG.image_size, 3)),
          "text_ids": jax.random.randint(keys[1], (batch, L), 1, CFG.vocab_size),
          "text_mask": jnp.ones((batch, L), bool),
          "box": jnp.concatenate([centre, size], axis=1),
          "valid": jnp.ones((batch,), bool)}


@pytest.fixture(scope="module")
def params():
  b = _batch()
  return jax.jit(ScanFormer(CFG).init)(jax.random.key(1), b["image"], b["text_ids"],
                                       b["text_mask"])["params"]


def _dense_replay(module, image, text_ids, text_mask, sparse_taken):
  """The dense scan (every patch a token) with the Gumbel decisions of `_scan_dense`,
  where each patch that the sparse scan could not hold gets mask 0 with no gradient:
  the dense reference of a sparse scan with overflow (force_taken with the
  straight-through gradient kept). Run with `model.apply(..., method=_dense_replay)`."""
  cfg = module.cfg
  rng = module.make_rng("gumbel")
  cache = module.encode_text(text_ids, text_mask)
  images = build_pyramid(image.astype(jnp.float32), cfg.image_sizes)
  mask = jnp.ones((image.shape[0], cfg.num_patches[0]), jnp.float32)
  outs = []
  for s, level in enumerate(images):
    out = module.scan_scale_dense(s, level, mask, cache)
    outs.append(out)
    if s == cfg.num_scales - 1:
      break
    cache = cache.append(out.kv)
    decide = selection.hard_gumbel_sigmoid(out.selection_logits, jax.random.fold_in(rng, s),
                                           cfg.tau)
    children = selection.upsample_to_children(mask * decide, cfg.grid_sizes[s])
    mask = children * (sparse_taken[s + 1] | (children < 0.5)).astype(jnp.float32)
  reg = jnp.stack([out.reg for out in outs], axis=1)
  heads = module.read_heads(reg)  # The model's own heads (exit heads on stop_gradient(REG)).
  return ScanFormerOutput(boxes=heads.boxes,
                          selection_logits=tuple(o.selection_logits for o in outs),
                          taken=tuple(o.taken for o in outs),
                          num_dropped=jnp.zeros((image.shape[0], cfg.num_scales), jnp.int32),
                          reg_features=reg, exit_heads=heads.raw, signals=heads.signals)


def _loss_and_grads(cfg, params, batch, rng, run):
  """(loss, terms, output, grads) of `run(model, params, inputs, rng) -> output`."""
  model = ScanFormer(cfg)

  def loss_fn(p):
    out = run(model, p, (batch["image"], batch["text_ids"], batch["text_mask"]), rng)
    total, terms = losses.scanformer_loss(out, batch["box"], batch["valid"], LOSS)
    return total, (terms, out)

  (total, (terms, out)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
                                         compiler_options=FAST_COMPILE)(params)
  return total, terms, out, grads


def _scan(mode, force_taken=None):
  def run(model, p, inputs, rng):
    return model.apply({"params": p}, *inputs, mode=mode, train=True, rngs={"gumbel": rng},
                       force_taken=force_taken)
  return run


def _assert_grads_close(actual, expected):
  """Every parameter: max |actual - expected| <= RTOL * max |expected| (per leaf), or
  <= 1e-9 for a leaf whose true gradient is 0 (attention key biases: softmax ignores a
  shift shared by all keys; both paths give rounding noise of ~1e-11 there)."""
  flat_actual = dict(jax.tree_util.tree_leaves_with_path(actual))
  for path, want in jax.tree_util.tree_leaves_with_path(expected):
    got, want = np.asarray(flat_actual[path]), np.asarray(want)
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    assert err <= RTOL * scale + 1e-9, (jax.tree_util.keystr(path), err, scale)


def _assert_nonzero(grads):
  """The test can fail: the gradients it compares reach the parts under test."""
  backbone = grads["backbone"]
  for name, tree in (("const_tokens", grads["const_tokens"]), ("select_head", grads["select_head"]),
                     ("patch_embed", backbone["patch_embed"]),
                     ("exit_heads/iou", grads["exit_heads"]["iou"]),
                     ("layers_0", backbone["layers_0"])):
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(tree)) > 0, name
  const = np.asarray(grads["const_tokens"])  # [S, D]: C_s is the input of replaced patches
  assert np.all(np.abs(const[1:]).max(axis=1) > 0)


def test_full_capacity_equals_dense(params):
  """Same noise, every patch fits: the same decisions, loss and gradient of every
  parameter as the dense path (the straight-through merged-token identity)."""
  batch, rng = _batch(), jax.random.key(7)
  dense = _loss_and_grads(CFG, params, batch, rng, _scan("dense"))
  sparse = _loss_and_grads(CFG, params, batch, rng, _scan("sparse"))
  for s in range(CFG.num_scales):
    np.testing.assert_array_equal(np.asarray(sparse[2].taken[s]), np.asarray(dense[2].taken[s]))
  keep = [float(dense[1][f"keep_s{s}"]) for s in (1, 2)]
  assert all(0.1 < k < 0.9 for k in keep), keep  # Patches are replaced at scales 1 and 2.
  assert int(np.asarray(sparse[2].num_dropped).sum()) == 0
  np.testing.assert_allclose(float(sparse[0]), float(dense[0]), rtol=RTOL)
  for name, value in dense[1].items():
    np.testing.assert_allclose(float(sparse[1][name]), float(value), rtol=RTOL, atol=1e-6,
                               err_msg=name)
  _assert_nonzero(dense[3])
  _assert_grads_close(sparse[3], dense[3])


def test_small_capacity_equals_dense_replay(params):
  """Patches over capacity: the sparse scan equals the dense scan of its own masks, in
  value (`force_taken`) and in gradients (the replay keeping straight-through)."""
  cfg = CFG.replace(capacity=SMALL_CAPACITY)
  batch, rng = _batch(), jax.random.key(7)
  sparse = _loss_and_grads(cfg, params, batch, rng, _scan("sparse"))
  dropped = np.asarray(sparse[2].num_dropped)  # [B, S]
  assert dropped[:, 1].sum() > 0, dropped  # The capacity cuts at scale 1.
  taken = tuple(np.asarray(t) > 0.5 for t in sparse[2].taken)
  for s, capacity in enumerate(SMALL_CAPACITY):
    assert taken[s].sum(axis=1).max() <= capacity
  forced = _loss_and_grads(CFG, params, batch, rng, _scan("dense", force_taken=taken))
  np.testing.assert_allclose(float(sparse[0]), float(forced[0]), rtol=RTOL)
  np.testing.assert_allclose(np.asarray(sparse[2].boxes), np.asarray(forced[2].boxes),
                             rtol=RTOL, atol=1e-6)

  def replay(model, p, inputs, rng):
    return model.apply({"params": p}, *inputs, taken, rngs={"gumbel": rng},
                       method=_dense_replay)
  reference = _loss_and_grads(CFG, params, batch, rng, replay)
  for s in range(CFG.num_scales):
    np.testing.assert_array_equal(np.asarray(reference[2].taken[s]) > 0.5, taken[s])
  np.testing.assert_allclose(float(sparse[0]), float(reference[0]), rtol=RTOL)
  _assert_nonzero(reference[3])
  _assert_grads_close(sparse[3], reference[3])


def _jitted_step(path, select_warmup_steps=0, capacity=None):
  config = ExperimentConfig(
      model=CFG, loss=LOSS, optim=OptimConfig(learning_rate=1e-3, warmup_steps=1),
      train=TrainConfig(num_steps=10, batch_size=B, path=path, slots=capacity,
                        select_warmup_steps=select_warmup_steps))
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  tx, schedules = optim.make_optimizer(config.optim, config.train.num_steps)
  shardings = train_state.state_shardings(CFG, tx, mesh, config.mesh)
  step = train_step.jit_train_step(
      train_step.make_train_step(CFG, LOSS, tx, schedules, config.train), shardings, mesh)
  return step, train_state.create_train_state(CFG, tx, 0, mesh, config.mesh), mesh


def test_sparse_step_compiles_twice_and_reports_drops():
  """Warm-up (dense, every patch), then sparse steps with drops: two compiled programs."""
  step, state, mesh = _jitted_step("sparse", select_warmup_steps=1, capacity=SMALL_CAPACITY)
  metrics = []
  for seed in range(3):
    state, m = step(state, sharding.to_global(
        {k: np.asarray(v) for k, v in _batch(seed).items()}, mesh))
    metrics.append({k: float(v) for k, v in m.items()})
  # Two programs: the warm-up (every patch) and the Gumbel step, switched on the host.
  assert step._cache_size() == 2  # pylint: disable=protected-access
  assert metrics[0]["keep_s1"] == metrics[0]["keep_s2"] == 1.0
  assert metrics[0]["dropped_s1"] == metrics[0]["dropped_s2"] == 0
  assert metrics[1]["keep_s1"] <= SMALL_CAPACITY[1] / CFG.num_patches[1]
  assert metrics[1]["dropped_s1"] + metrics[2]["dropped_s1"] > 0
  assert all(m["finite"] == 1 for m in metrics) and int(state.step) == 3


def test_default_capacity_from_targets():
  model = ModelConfig.vilt_b32()  # 16, 64, 256 patches
  assert TrainConfig().sparse_slots(model, LossConfig(target_ratio=(1.0, 0.5, 0.25))) == (
      16, 48, 96)  # ceil(1.5 * 0.5 * 64) = 48; ceil(1.5 * 0.25 * 256) = 96
  assert TrainConfig().sparse_slots(model, LossConfig(target_ratio=(1.0, 0.9, 0.1))) == (
      16, 64, 40)  # capped at N_1; 38.4 -> 39 -> 40 (a multiple of 8)
  with pytest.raises(ValueError, match=r"train.slots\[0\] must be 16"):
    TrainConfig(slots=(8, 16, 16)).sparse_slots(model, LossConfig())
  with pytest.raises(ValueError, match="one entry per scale"):
    TrainConfig(slots=(16, 16)).sparse_slots(model, LossConfig())
  with pytest.raises(ValueError, match="path must be dense or sparse"):
    TrainConfig(path="ragged")


def test_bad_capacity_is_a_user_error():
  tx, schedules = optim.make_optimizer(OptimConfig(), 10)
  bad = dataclasses.replace(TrainConfig(), path="sparse", slots=(4, 99, 12))
  with pytest.raises(UserError, match=r"train.slots\[1\]=99 outside \[1, 16\]"):
    train_step.make_train_step(CFG, LOSS, tx, schedules, bad)


def test_train_flops_count_backward_and_every_patch_projection():
  cfg = bench.bench_config("vilt_b32", 0.25, "float32")  # capacities 16, 16, 64
  assert bench.train_flops(cfg, 40, "dense") == pytest.approx(3 * flops.dense_flops(cfg, 40))
  # Sparse: the slots as run, plus the projection of the patches outside the slots.
  outside = sum(n - c for n, c in zip(cfg.num_patches, cfg.capacities))
  projection = 2.0 * cfg.patch_size ** 2 * 3 * cfg.hidden_size
  assert bench.train_flops(cfg, 40, "sparse") == pytest.approx(
      3 * (flops.sparse_flops_as_run(cfg, 40) + outside * projection))
