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

  @property
  def length(self) -> int:
    return self.bias.shape[1]

  def layer(self, index: int) -> tuple[jax.Array, jax.Array]:
    return self.keys[index], self.values[index]

  @classmethod
  def start(cls, keys, values, bias: jax.Array) -> "KVCache":
    """The cache holding one first block (the text)."""
    return cls(keys=tuple(keys), values=tuple(values), bias=bias)

  def append(self, keys, values, bias: jax.Array) -> "KVCache":
    """A cache with one more block: per-layer keys/values [B, T', H, Dh], bias [B, T']."""
    chex.assert_equal(len(keys), len(self.keys))
    cat = lambda old, new: jnp.concatenate([old, new.astype(old.dtype)], axis=1)
    return KVCache(keys=tuple(map(cat, self.keys, keys)),
                   values=tuple(map(cat, self.values, values)),
                   bias=jnp.concatenate([self.bias, bias], axis=1))
