"""selection.py: parent/child geometry, Gumbel decisions, top-k and capacity slots."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scanformer_jax import ModelConfig, selection
from scanformer_jax.layers import patchify


def test_upsample_to_children_copies_each_parent_to_its_four_children():
  grid = 3
  parents = jnp.arange(grid * grid, dtype=jnp.float32)[None] + 1  # [1, 9]
  children = np.asarray(selection.upsample_to_children(parents, grid)).reshape(6, 6)
  for i in range(6):
    for j in range(6):
      assert children[i, j] == parents[0, (i // 2) * grid + (j // 2)]


def test_children_cover_the_parent_patch_pixels():
  """The parent index of a fine patch, by pixels, equals upsample_to_children's."""
  p, grid = 4, 3
  fine = 2 * grid * p  # Finer image side: its patches of p px are the children.
  rows, cols = np.meshgrid(np.arange(fine), np.arange(fine), indexing="ij")
  # A pixel of the fine image lies in coarse patch (r // 2p, c // 2p).
  label = (rows // (2 * p)) * grid + cols // (2 * p)
  image = jnp.asarray(np.broadcast_to(label[None, :, :, None], (1, fine, fine, 3)), jnp.float32)
  patches = patchify(image, p)  # [1, (2g)^2, p*p*3]
  np.testing.assert_array_equal(patches.min(-1), patches.max(-1))  # One parent each.
  expected = selection.upsample_to_children(jnp.arange(grid * grid, dtype=jnp.float32)[None],
                                            grid)
  np.testing.assert_array_equal(patches[..., 0], expected)


def test_topk_mask_picks_best_candidates_only():
  candidates = jnp.array([[True, False, True, True, False],
                          [False, False, True, False, False]])
  scores = jnp.array([[0.1, 9.0, 0.5, 0.3, 8.0],
                      [5.0, 4.0, -1.0, 3.0, 2.0]])
  got = np.asarray(selection.topk_mask(candidates, scores, 2))
  np.testing.assert_array_equal(got, [[False, False, True, True, False],
                                      # Fewer candidates than k: only the candidate.
                                      [False, False, True, False, False]])


def test_wanted_children_threshold_and_topk():
  parent_taken = jnp.array([[True, True, False, True]])   # 2 x 2 grid
  parent_logits = jnp.array([[2.0, -2.0, 5.0, 0.5]])
  cfg = ModelConfig.tiny(select_threshold=0.5)
  assert cfg.grid_sizes[0] == 2 and cfg.selection_rule == "threshold"
  wanted, scores = selection.wanted_children(cfg, 0, parent_taken, parent_logits)
  # Parent 0 (taken, p>0.5) and 3 (taken, sigmoid(0.5)>0.5); parent 2 not taken.
  expect_parents = np.array([True, False, False, True])
  np.testing.assert_array_equal(
      wanted, selection.upsample_to_children(jnp.asarray(expect_parents)[None], 2))
  np.testing.assert_array_equal(scores, selection.upsample_to_children(parent_logits, 2))
  # topk=6: the 4 children of parent 0 (best logit) and 2 of parent 3's;
  # the children of parent 1 (logit -2, still a candidate) lose.
  cfg_k = cfg.replace(select_topk=(4, 6, 64))
  assert cfg_k.selection_rule == "topk"
  wanted_k, _ = selection.wanted_children(cfg_k, 0, parent_taken, parent_logits)
  wanted_k = np.asarray(wanted_k).reshape(4, 4)
  assert wanted_k.sum() == 6
  assert wanted_k[:2, :2].all() and not wanted_k[:2, 2:].any() and not wanted_k[2:, :2].any()
  assert wanted_k[2:, 2:].sum() == 2


def test_capacity_slots_keeps_best_and_counts_drops():
  wanted = jnp.array([[True, True, False, True, True, False],
                      [False, True, False, False, False, False]])
  scores = jnp.array([[0.2, 0.9, 5.0, 0.1, 0.7, 3.0],
                      [1.0, 0.3, 2.0, 0.0, 0.0, 0.0]])
  index, valid, taken, dropped = selection.capacity_slots(wanted, scores, 3)
  # Row 0: 4 wanted, 3 slots -> best scores first (1, 4, 0); patch 3 dropped.
  np.testing.assert_array_equal(index[0], [1, 4, 0])
  np.testing.assert_array_equal(valid, [[True, True, True], [True, False, False]])
  np.testing.assert_array_equal(taken, [[True, True, False, False, True, False],
                                        [False, True, False, False, False, False]])
  np.testing.assert_array_equal(dropped, [1, 0])
  assert int(index[1, 0]) == 1  # The one wanted patch takes the first slot.


def test_capacity_slots_full_capacity_drops_nothing():
  wanted = jax.random.bernoulli(jax.random.key(0), 0.5, (4, 16))
  scores = jax.random.normal(jax.random.key(1), (4, 16))
  _, valid, taken, dropped = selection.capacity_slots(wanted, scores, 16)
  np.testing.assert_array_equal(taken, wanted)
  np.testing.assert_array_equal(valid.sum(1), wanted.sum(1))
  assert not np.asarray(dropped).any()


def test_capacity_slots_shape_check_fires():
  with pytest.raises(AssertionError):
    selection.capacity_slots(jnp.ones((2, 8), bool), jnp.ones((2, 7)), 4)


def test_hard_gumbel_sigmoid_is_binary_with_straight_through_gradient():
  logits = jnp.linspace(-3.0, 3.0, 64).reshape(2, 32)
  rng = jax.random.key(3)
  hard = selection.hard_gumbel_sigmoid(logits, rng, tau=0.7)
  assert set(np.unique(np.asarray(hard)).tolist()) <= {0.0, 1.0}
  assert 0 < float(hard.sum()) < hard.size  # Both decisions occur: the noise is live.
  weights = jnp.arange(64.0).reshape(2, 32)
  grad = jax.grad(lambda x: (selection.hard_gumbel_sigmoid(x, rng, 0.7) * weights).sum())(logits)
  # Straight-through: the gradient of sigmoid((logits + noise) / tau), same noise.
  uniform = jax.random.uniform(rng, logits.shape, jnp.float32, 1e-6, 1.0 - 1e-6)
  noise = jnp.log(uniform) - jnp.log1p(-uniform)
  soft = jax.nn.sigmoid((logits + noise) / 0.7)
  np.testing.assert_allclose(grad, weights * soft * (1 - soft) / 0.7, rtol=1e-5, atol=1e-7)
