"""layers.py: the merged-token identity of `attend`, fused == einsum attention,
interpolation, patch order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scanformer_jax.layers import (BIAS_CHANNELS, NEG_INF, attend, attend_einsum, attend_fused,
                                   bias_channels, fused_head_dim,
                                   attention_implementation, interpolate_pos_grid,
                                   interpolation_matrix, patchify)

B, TQ, H, DH = 2, 5, 3, 8


def _qkv(num_keys, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (B, TQ, H, DH))
  k = jax.random.normal(keys[1], (B, num_keys, H, DH))
  v = jax.random.normal(keys[2], (B, num_keys, H, DH))
  return q, k, v


@pytest.mark.parametrize("n", [1, 2, 7])
def test_merged_token_with_log_n_bias_equals_n_copies(n):
  q, k, v = _qkv(6)
  const_k = jax.random.normal(jax.random.key(10), (B, 1, H, DH))
  const_v = jax.random.normal(jax.random.key(11), (B, 1, H, DH))
  # n explicit copies of the constant token, plain bias 0.
  k_copies = jnp.concatenate([k] + [const_k] * n, axis=1)
  v_copies = jnp.concatenate([v] + [const_v] * n, axis=1)
  explicit = attend(q, k_copies, v_copies, jnp.zeros((1, 1, 1, 6 + n)))
  # One merged token whose key carries log n.
  bias = jnp.concatenate([jnp.zeros((6,)), jnp.log(jnp.array([float(n)]))])
  merged = attend(q, jnp.concatenate([k, const_k], 1), jnp.concatenate([v, const_v], 1),
                  bias[None, None, None])
  np.testing.assert_allclose(merged, explicit, atol=1e-5, rtol=1e-5)
  if n > 1:  # Without the bias the merged token is under-weighted: the test can fail.
    plain = attend(q, jnp.concatenate([k, const_k], 1), jnp.concatenate([v, const_v], 1),
                   jnp.zeros((1, 1, 1, 7)))
    assert float(jnp.abs(plain - explicit).max()) > 1e-3


def test_merged_token_with_no_copies_is_removed():
  q, k, v = _qkv(6)
  const = jax.random.normal(jax.random.key(12), (B, 1, H, DH))
  without = attend(q, k, v, jnp.zeros((1, 1, 1, 6)))
  bias = jnp.concatenate([jnp.zeros((6,)), jnp.array([NEG_INF])])[None, None, None]
  with_dead = attend(q, jnp.concatenate([k, const], 1), jnp.concatenate([v, const], 1), bias)
  np.testing.assert_allclose(with_dead, without, atol=1e-6, rtol=1e-6)


def test_padding_keys_with_neg_inf_get_no_weight():
  q, k, v = _qkv(6)
  bias = jnp.where(jnp.arange(6) < 4, 0.0, NEG_INF)[None, None, None]  # keys 4, 5 padded
  k_junk = k.at[:, 4:].set(100.0)
  v_junk = v.at[:, 4:].set(1e4)
  np.testing.assert_allclose(attend(q, k_junk, v_junk, bias),
                             attend(q, k[:, :4], v[:, :4], jnp.zeros((1, 1, 1, 4))),
                             atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("num_queries,num_keys", [(5, 7), (4, 8), (5, 8), (4, 7)])
@pytest.mark.parametrize("full_bias", [False, True])
def test_fused_attention_matches_einsum(num_queries, num_keys, full_bias):
  """`jax.nn.dot_product_attention` through `attend_fused` (odd lengths padded) is the
  einsum attention, with NEG_INF padding and a log n merged-token bias."""
  keys = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(keys[0], (B, num_queries, H, DH))
  k = jax.random.normal(keys[1], (B, num_keys, H, DH))
  v = jax.random.normal(keys[2], (B, num_keys, H, DH))
  key_bias = jnp.zeros((B, num_keys)).at[:, 1].set(NEG_INF).at[:, -1].set(jnp.log(5.0))
  bias = key_bias[:, None, None, :]  # [B, 1, 1, Tk]
  if full_bias:  # Per-query bias too, as the block-causal reference passes.
    bias = bias + jax.random.normal(keys[3], (B, 1, num_queries, num_keys))
  want = attend_einsum(q, k, v, bias)
  got = attend_fused(q, k, v, bias, "xla")
  assert got.shape == (B, num_queries, H, DH)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU rule")
def test_cpu_attends_with_einsums():
  for dtype in (jnp.float32, jnp.bfloat16):
    assert attention_implementation(dtype, 64) == "einsum"


def test_interpolation_matrix_align_corners_hand_examples():
  np.testing.assert_allclose(interpolation_matrix(3, 2), [[1, 0], [0.5, 0.5], [0, 1]])
  # out 4 from in 3: sample points 0, 2/3, 4/3, 2 (corners aligned).
  np.testing.assert_allclose(interpolation_matrix(4, 3),
                             [[1, 0, 0], [1 / 3, 2 / 3, 0], [0, 2 / 3, 1 / 3], [0, 0, 1]],
                             atol=1e-7)
  # Downsampling 5 -> 3 samples points 0, 2, 4 exactly.
  np.testing.assert_allclose(interpolation_matrix(3, 5), np.eye(5)[[0, 2, 4]])
  np.testing.assert_allclose(interpolation_matrix(1, 4), [[1, 0, 0, 0]])
  np.testing.assert_allclose(interpolation_matrix(6, 6), np.eye(6))


def test_interpolate_pos_grid_is_separable_bilinear():
  grid = jax.random.normal(jax.random.key(0), (3, 3, 2))
  out = np.asarray(interpolate_pos_grid(grid, 5, 4))
  assert out.shape == (5, 4, 2)
  g = np.asarray(grid)
  # Output (1, 1): row 0.5 of 2, column 2/3 of 2 -> bilinear of g[0:2, 0:2].
  fy, fx = 0.5, 2 / 3
  want = ((1 - fy) * ((1 - fx) * g[0, 0] + fx * g[0, 1])
          + fy * ((1 - fx) * g[1, 0] + fx * g[1, 1]))
  np.testing.assert_allclose(out[1, 1], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[0, 0], g[0, 0], rtol=1e-6)    # Corners are aligned.
  np.testing.assert_allclose(out[-1, -1], g[-1, -1], rtol=1e-6)


def test_patchify_row_major_patches_row_col_channel_pixels():
  image = jnp.arange(1 * 4 * 6 * 3, dtype=jnp.float32).reshape(1, 4, 6, 3)
  patches = patchify(image, 2)  # [1, 2*3, 12]
  assert patches.shape == (1, 6, 12)
  # Patch 4 is grid (1, 1): rows 2..3, cols 2..3.
  np.testing.assert_array_equal(patches[0, 4], image[0, 2:4, 2:4, :].reshape(-1))


def _merged_and_padded(batch, num_keys, seed):
  """A per-key bias as the scan builds it: padding NEG_INF, merged tokens log n."""
  rng = np.random.default_rng(seed)
  bias = np.zeros((batch, num_keys), np.float32)
  bias[:, 2] = NEG_INF                          # An empty slot.
  bias[:, -3:-1] = NEG_INF                      # Bucket padding at the end.
  bias[:, -1] = np.log(rng.integers(1, 274, batch))  # Merged token: log n, n <= 273.
  return jnp.asarray(bias)[:, None, None, :]    # [B, 1, 1, Tk]


@pytest.mark.parametrize("num_queries,num_keys", [(5, 9), (6, 12)])
def test_fused_per_key_bias_equals_einsum_with_gradients(num_queries, num_keys):
  """The bias carried in extra head channels: outputs and q/k/v gradients are the einsum's
  (f32, 1e-5), and no [B, 1, Tq, Tk] array appears in the program (forward or backward)."""
  keys = jax.random.split(jax.random.key(7), 4)
  q = jax.random.normal(keys[0], (B, num_queries, H, DH))
  k = jax.random.normal(keys[1], (B, num_keys, H, DH))
  v = jax.random.normal(keys[2], (B, num_keys, H, DH))
  bias = _merged_and_padded(B, num_keys, 0)
  cot = jax.random.normal(keys[3], (B, num_queries, H, DH))

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v, bias) * cot)
  fused = lambda q, k, v, b: attend_fused(q, k, v, b, "xla")  # noqa: E731
  np.testing.assert_allclose(fused(q, k, v, bias), attend_einsum(q, k, v, bias),
                             atol=1e-5, rtol=1e-5)
  got = jax.grad(lambda *a: loss(fused, *a), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(lambda *a: loss(attend_einsum, *a), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
  jaxpr = jax.make_jaxpr(jax.grad(lambda *a: loss(fused, *a), argnums=(0, 1, 2)))(q, k, v)
  shapes = {tuple(var.aval.shape) for eqn in jaxpr.jaxpr.eqns for var in eqn.outvars}
  bias_like = {(B, 1, nq, nk) for nq in (num_queries, num_queries + 1)
               for nk in (num_keys, num_keys + 1)}
  assert not shapes & bias_like, shapes & bias_like


def test_bias_channels_keep_log_n_float32_exact_in_bfloat16():
  bias = _merged_and_padded(B, 9, 1)[:, 0, 0, :]  # [B, Tk]
  scale = DH ** -0.5
  channels = bias_channels(bias, jnp.bfloat16, scale)
  assert channels.dtype == jnp.bfloat16 and channels.shape == (B, 9, BIAS_CHANNELS)
  back = channels.astype(jnp.float32).sum(-1) * scale
  merged = bias[:, -1]
  np.testing.assert_allclose(back[:, -1], merged, rtol=1e-6, atol=1e-7)
  # One bfloat16 channel (the old bias cast) is off by up to 2^-9 relative.
  one = channels[..., 0].astype(jnp.float32)[:, -1] * scale
  assert float(jnp.max(jnp.abs(one - merged))) > 1e-4
  assert bool(jnp.all(back[:, 2] < -1e8))  # Padding keeps weight exactly 0.
  assert fused_head_dim(DH) % 8 == 0 and fused_head_dim(64) == 72
