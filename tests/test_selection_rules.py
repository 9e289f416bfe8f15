"""Selection rules are registered by name: a rule defined here runs in both paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scanformer_jax import ModelConfig, ScanFormer, selection

B, L = 2, 6
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@selection.rule("test_below_mean")
def below_mean(candidates, scores, cfg, scale):
  """The candidates whose parent logit is below their row's mean (the weaker ones)."""
  del cfg, scale
  mean = (jnp.where(candidates, scores, 0.0).sum(axis=1, keepdims=True)
          / jnp.maximum(candidates.sum(axis=1, keepdims=True), 1))
  return candidates & (scores < mean)


CFG = ModelConfig.tiny(select_rule="test_below_mean")


def _children(x, grid):
  x = np.asarray(x).reshape(-1, grid, grid)
  return x.repeat(2, axis=1).repeat(2, axis=2).reshape(x.shape[0], -1)


@pytest.fixture(scope="module")
def scans():
  keys = jax.random.split(jax.random.key(0), 3)
  image = jax.random.uniform(keys[0], (B, CFG.image_size, CFG.image_size, 3))
  text_ids = jax.random.randint(keys[1], (B, L), 1, CFG.vocab_size)
  text_mask = jnp.ones((B, L), bool)
  net = ScanFormer(CFG)
  variables = jax.jit(net.init, compiler_options=FAST_COMPILE)(keys[2], image, text_ids,
                                                               text_mask)
  run = lambda mode: jax.jit(lambda v, *x: net.apply(v, *x, mode=mode),
                             compiler_options=FAST_COMPILE)(variables, image, text_ids,
                                                            text_mask)
  return run("sparse"), run("dense")


def test_a_registered_rule_decides_both_paths(scans):
  sparse, dense = scans
  for out in scans:
    for s in range(1, CFG.num_scales):
      grid = CFG.grid_sizes[s - 1]
      candidates = _children(out.taken[s - 1], grid).astype(bool)
      scores = _children(out.selection_logits[s - 1], grid)
      mean = np.array([row[c].mean() if c.any() else 0.0 for row, c in zip(scores, candidates)])
      expected = candidates & (scores < mean[:, None])
      np.testing.assert_array_equal(out.taken[s], expected)
  for s in range(CFG.num_scales):
    np.testing.assert_array_equal(sparse.taken[s], dense.taken[s])
  counts = np.asarray(sparse.taken[1]).sum(axis=1)  # Non-vacuous: the rule chose.
  assert ((counts > 0) & (counts < CFG.num_patches[1])).any(), counts
  np.testing.assert_allclose(sparse.boxes, dense.boxes, atol=1e-4, rtol=0)


def test_an_unknown_rule_is_a_clear_error():
  cfg = ModelConfig.tiny(select_rule="no_such_rule")
  taken, logits = jnp.ones((1, 4), bool), jnp.zeros((1, 4))
  with pytest.raises(ValueError, match="'no_such_rule' is not a registered selection rule"):
    selection.wanted_children(cfg, 0, taken, logits)
  with pytest.raises(ValueError, match="already registered"):
    selection.rule("threshold")(below_mean)


def test_select_topk_selects_the_topk_rule():
  assert ModelConfig.tiny().selection_rule == "threshold"
  counts = (4, 6, 10)
  assert ModelConfig.tiny(select_topk=counts).selection_rule == "topk"
  assert ModelConfig.tiny(select_rule="topk", select_topk=counts).selection_rule == "topk"
  with pytest.raises(ValueError, match="select_topk selects the 'topk' rule"):
    ModelConfig.tiny(select_rule="test_below_mean", select_topk=counts)
  with pytest.raises(ValueError, match="needs select_topk"):
    selection.wanted_children(ModelConfig.tiny(select_rule="topk"), 0, jnp.ones((1, 4), bool),
                              jnp.zeros((1, 4)))
