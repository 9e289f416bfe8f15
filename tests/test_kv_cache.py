"""kv_cache.py: a cache of blocks, appended along the token axis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scanformer_jax.kv_cache import KVCache

B, H, DH, LAYERS = 2, 3, 4, 2


def _block(t, seed, dtype=jnp.float32):
  """A block of t tokens: per-layer keys/values [B, t, H, Dh] and a bias [B, t]."""
  keys = jax.random.split(jax.random.key(seed), 2 * LAYERS + 1)
  kv = [jax.random.normal(k, (B, t, H, DH)).astype(dtype) for k in keys[:-1]]
  bias = jnp.where(jax.random.bernoulli(keys[-1], 0.7, (B, t)), 0.0, -1e9)
  return kv[:LAYERS], kv[LAYERS:], bias


def test_start_holds_one_block():
  keys, values, bias = _block(5, 0)
  cache = KVCache.start(keys, values, bias)
  assert isinstance(cache.keys, tuple) and len(cache.keys) == len(cache.values) == LAYERS
  assert cache.bias.shape == (B, 5)
  for i in range(LAYERS):
    k, v = cache.layer(i)
    np.testing.assert_array_equal(k, keys[i])
    np.testing.assert_array_equal(v, values[i])


def test_append_concatenates_every_layer_and_the_bias_in_order():
  first, second, third = _block(5, 0), _block(3, 1), _block(1, 2)
  cache = KVCache.start(*first).append(KVCache.start(*second)).append(KVCache.start(*third))
  assert cache.bias.shape == (B, 9)  # The length: 5 + 3 + 1 tokens.
  for i in range(LAYERS):
    k, v = cache.layer(i)
    assert k.shape == v.shape == (B, 9, H, DH)
    np.testing.assert_array_equal(k, jnp.concatenate([b[0][i] for b in (first, second, third)], 1))
    np.testing.assert_array_equal(v, jnp.concatenate([b[1][i] for b in (first, second, third)], 1))
  np.testing.assert_array_equal(cache.bias, jnp.concatenate([b[2] for b in (first, second,
                                                                              third)], 1))


def test_append_keeps_the_cache_dtype():
  cache = KVCache.start(*_block(4, 0, jnp.bfloat16))
  grown = cache.append(KVCache.start(*_block(2, 1, jnp.float32)))
  for i in range(LAYERS):
    k, v = grown.layer(i)
    assert k.dtype == v.dtype == jnp.bfloat16
  assert grown.bias.dtype == jnp.float32
  np.testing.assert_array_equal(grown.layer(0)[0][:, 4:],
                                _block(2, 1, jnp.float32)[0][0].astype(jnp.bfloat16))


def test_cache_is_a_pytree_through_jit():
  cache = KVCache.start(*_block(4, 0))
  block = KVCache.start(*_block(2, 1))
  grown = jax.jit(lambda c, b: c.append(b))(cache, block)
  assert isinstance(grown, KVCache) and grown.bias.shape == (B, 6)
  assert len(jax.tree.leaves(grown)) == 2 * LAYERS + 1


def test_shape_checks_fire():
  keys, values, bias = _block(4, 0)
  with pytest.raises(AssertionError):
    KVCache.start(keys, values[:1], bias)  # A layer's values missing.
  with pytest.raises(AssertionError):
    KVCache.start(keys, values, bias[:, :3])  # Bias over 3 tokens, keys over 4.
  cache = KVCache.start(keys, values, bias)
  short_keys, short_values, short_bias = _block(2, 1)
  with pytest.raises(AssertionError):  # A block of fewer layers.
    cache.append(KVCache.start(short_keys[:1], short_values[:1], short_bias))
