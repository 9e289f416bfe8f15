"""Patch selection: hierarchical taken masks, Gumbel decisions, capacity top-k.

Patch (i, j) of a G x G grid has the four children (2i..2i+1, 2j..2j+1) on the
2G x 2G grid of the next scale. A child is taken iff its parent was taken and the
parent's selection logit says "take my children". All masks are flat [B, G*G]
in row-major patch order.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from scanformer_jax.layers import NEG_INF


def upsample_to_children(x: jax.Array, grid: int) -> jax.Array:
  """Copies each parent value to its four children: [B, G*G] -> [B, 4*G*G]."""
  b = x.shape[0]
  x = x.reshape(b, grid, 1, grid, 1)
  x = jnp.broadcast_to(x, (b, grid, 2, grid, 2))
  return x.reshape(b, 4 * grid * grid)


def hard_gumbel_sigmoid(logits: jax.Array, rng: jax.Array, tau: float) -> jax.Array:
  """0/1 decisions with logistic noise and a straight-through sigmoid gradient.

  The forward value is exactly 0 or 1 (`soft - stop_gradient(soft)` is exactly 0),
  the backward pass is that of sigmoid((logits + noise) / tau).
  """
  uniform = jax.random.uniform(rng, logits.shape, jnp.float32, 1e-6, 1.0 - 1e-6)
  noise = jnp.log(uniform) - jnp.log1p(-uniform)  # Logistic(0, 1).
  soft = jax.nn.sigmoid((logits.astype(jnp.float32) + noise) / tau)
  hard = (soft > 0.5).astype(jnp.float32)
  return hard + (soft - jax.lax.stop_gradient(soft))


def threshold_decision(logits: jax.Array, threshold: float) -> jax.Array:
  """Inference decision: take the children iff sigmoid(logit) > threshold."""
  return jax.nn.sigmoid(logits.astype(jnp.float32)) > threshold


def topk_mask(candidates: jax.Array, scores: jax.Array, k: int) -> jax.Array:
  """The k highest-scoring candidates per row (fewer if fewer are candidates)."""
  masked = jnp.where(candidates, scores, NEG_INF)
  _, idx = jax.lax.top_k(masked, k)  # [B, k]
  chosen = jnp.zeros_like(candidates).at[jnp.arange(candidates.shape[0])[:, None], idx].set(True)
  return chosen & candidates


def wanted_children(parent_taken: jax.Array, parent_logits: jax.Array, parent_grid: int,
                    threshold: float, topk: Optional[int]) -> tuple[jax.Array, jax.Array]:
  """Inference selection of scale s+1 from scale s.

  Returns (wanted [B, 4N] bool, scores [B, 4N]: each child's parent logit, the
  priority used when a capacity or a fixed count must choose among them).
  """
  scores = upsample_to_children(parent_logits.astype(jnp.float32), parent_grid)
  candidates = upsample_to_children(parent_taken, parent_grid)
  if topk is not None:
    return topk_mask(candidates, scores, topk), scores
  decide = threshold_decision(parent_logits, threshold)
  return upsample_to_children(parent_taken & decide, parent_grid), scores


def capacity_slots(wanted: jax.Array, scores: jax.Array, capacity: int):
  """Fits the wanted patches into `capacity` static slots, best scores first.

  Returns:
    index: [B, C] patch index held by each slot.
    valid: [B, C] bool, the slot holds a wanted patch (else it is padding).
    taken: [B, N] bool, wanted patches that got a slot.
    num_dropped: [B] int32, wanted patches left out for lack of slots.
  """
  b, n = wanted.shape
  chex.assert_equal_shape([wanted, scores])
  _, index = jax.lax.top_k(jnp.where(wanted, scores, NEG_INF), capacity)  # [B, C]
  count = wanted.sum(axis=1, dtype=jnp.int32)  # [B]
  valid = jnp.arange(capacity)[None, :] < jnp.minimum(count, capacity)[:, None]
  taken = jnp.zeros((b, n), bool).at[jnp.arange(b)[:, None], index].set(valid)
  return index, valid, taken, count - valid.sum(axis=1, dtype=jnp.int32)
