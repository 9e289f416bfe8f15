"""The KV cache: an explicit pytree of every earlier block's keys and values.

Layout along the token axis, fixed at trace time: text (block 0), then each scanned
scale's block in order. Blocks are appended by concatenation, so each scale attends
to exactly the tokens before it, with no masked-out future slots to pay for.
"""

from __future__ import annotations

import chex
import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
  keys: tuple[jax.Array, ...]    # per layer [B, T, H, Dh]
  values: tuple[jax.Array, ...]  # per layer [B, T, H, Dh]
  bias: jax.Array                # [B, T] additive key bias, shared by all layers

  def layer(self, index: int) -> tuple[jax.Array, jax.Array]:
    return self.keys[index], self.values[index]

  @classmethod
  def start(cls, keys, values, bias: jax.Array) -> "KVCache":
    """The cache of one block: per-layer keys/values [B, T, H, Dh], bias [B, T]."""
    b, t = bias.shape
    chex.assert_equal(len(keys), len(values))
    chex.assert_shape([*keys, *values], (b, t, None, None))
    return cls(keys=tuple(keys), values=tuple(values), bias=bias)

  def append(self, block: "KVCache") -> "KVCache":
    """This cache with `block`'s tokens after its own, in this cache's dtypes."""
    chex.assert_equal(len(block.keys), len(self.keys))
    cat = lambda old, new: jnp.concatenate([old, new.astype(old.dtype)], axis=1)
    return KVCache(keys=tuple(map(cat, self.keys, block.keys)),
                   values=tuple(map(cat, self.values, block.values)),
                   bias=cat(self.bias, block.bias))
