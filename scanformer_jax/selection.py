"""Patch selection: hierarchical taken masks, Gumbel decisions, rules, capacity slots.

Patch (i, j) of a G x G grid has the four children (2i..2i+1, 2j..2j+1) on the
2G x 2G grid of the next scale. A child is taken iff its parent was taken and the
parent's selection logit says "take my children". All masks are flat [B, G*G]
in row-major patch order.

Inference selection is a rule from `RULES`, named by `ModelConfig.selection_rule`.
A rule sees the children that may be taken and their parents' logits and returns
the children it wants; a new one is a function registered with `@rule("name")`.
Training decisions are a rule from `TRAIN_RULES` (`ModelConfig.train_select_rule`,
default hard Gumbel-sigmoid), registered with `@train_rule("name")`.
"""

from __future__ import annotations

from typing import Callable, Optional

import chex
import flax.struct
import jax
import jax.numpy as jnp

from scanformer_jax.config import ModelConfig
from scanformer_jax.layers import NEG_INF

# (candidates [B, N] bool, scores [B, N] float32, cfg, scale) -> wanted [B, N] bool, for
# the N patches of `scale` >= 1. candidates: children of taken parents; scores: each
# child's parent logit. A rule must want candidates only (wanted_children enforces it).
SelectionRule = Callable[[jax.Array, jax.Array, ModelConfig, int], jax.Array]
RULES: dict[str, SelectionRule] = {}
# (logits [B, N] float32, rng, cfg, scale) -> decisions [B, N] float32, exactly 0 or 1
# in value with a straight-through gradient to the logits: "take this patch's
# children?" for the N patches of `scale` during training (`model.train_select_rule`).
TrainRule = Callable[[jax.Array, jax.Array, ModelConfig, int], jax.Array]
TRAIN_RULES: dict[str, TrainRule] = {}


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


def _row_top_indices(values: jax.Array, k: int) -> jax.Array:
  """Indices [k] of the k largest of one row [N], ties to the lower index (as lax.top_k).

  A stable sort, not `lax.top_k`: the SPMD partitioner splits a sort along the batch
  but gathers the whole batch onto every device for a TopK.
  """
  return jnp.argsort(-values, stable=True)[:k]


def _row_topk_mask(candidates: jax.Array, scores: jax.Array, k: int) -> jax.Array:
  """One row [N]: the k highest-scoring candidates (fewer if fewer are candidates)."""
  idx = _row_top_indices(jnp.where(candidates, scores, NEG_INF), k)  # [k]
  return jnp.zeros_like(candidates).at[idx].set(True) & candidates


def topk_mask(candidates: jax.Array, scores: jax.Array, k: int) -> jax.Array:
  """The k highest-scoring candidates per row [B, N] (fewer if fewer are candidates).

  Per sample (vmapped): with the batch sharded, each device selects its own rows and
  the partitioned program needs no collective (a batched scatter with explicit row
  indices gathers the global batch on every device).
  """
  return jax.vmap(lambda c, x: _row_topk_mask(c, x, k))(candidates, scores)


def _registrar(table: dict, what: str):
  """`@decorator("name")` that adds a function to `table` (each name only once)."""
  def decorator(name: str):
    def register(fn):
      if name in table:
        raise ValueError(f"{what} {name!r} is already registered")
      table[name] = fn
      return fn
    return register
  return decorator


# `@rule("name")`: a selection rule (a `select_rule` value).
rule = _registrar(RULES, "selection rule")
# `@train_rule("name")`: a training decision rule (a `train_select_rule` value).
train_rule = _registrar(TRAIN_RULES, "training selection rule")


@train_rule("gumbel")
def gumbel_rule(logits, rng, cfg, scale):
  """Hard Gumbel-sigmoid decisions at temperature `cfg.tau` (DESIGN.md, Selection)."""
  del scale
  return hard_gumbel_sigmoid(logits, rng, cfg.tau)


def train_decisions(cfg: ModelConfig, scale: int, logits: jax.Array, rng: jax.Array
                    ) -> jax.Array:
  """`cfg.train_select_rule`'s decisions [B, N_s] for the patches of `scale`."""
  name = cfg.train_select_rule
  if name not in TRAIN_RULES:
    raise ValueError(f"train_select_rule {name!r} is not a registered training rule "
                     f"({', '.join(sorted(TRAIN_RULES))}); register it with "
                     "@selection.train_rule")
  decide = TRAIN_RULES[name](logits, rng, cfg, scale)
  chex.assert_equal_shape([decide, logits])
  return decide


@rule("threshold")
def threshold_rule(candidates, scores, cfg, scale):
  """Children of parents with sigmoid(logit) > select_threshold."""
  del scale
  return candidates & threshold_decision(scores, cfg.select_threshold)


@rule("topk")
def topk_rule(candidates, scores, cfg, scale):
  """Exactly the top `select_topk[scale]` candidates by parent logit (fewer if fewer)."""
  if cfg.select_topk is None:
    raise ValueError("select_rule 'topk' needs select_topk (one count per scale)")
  return topk_mask(candidates, scores, cfg.select_topk[scale])


def wanted_children(cfg: ModelConfig, parent_scale: int, parent_taken: jax.Array,
                    parent_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Inference selection of scale s+1 from scale s = parent_scale, by cfg's rule.

  parent_taken: [B, N_s] bool; parent_logits: [B, N_s]. Returns (wanted [B, N_{s+1}]
  bool, scores [B, N_{s+1}]: each child's parent logit, the priority used when a
  capacity must choose among them).
  """
  name = cfg.selection_rule
  if name not in RULES:
    raise ValueError(f"select_rule {name!r} is not a registered selection rule "
                     f"({', '.join(sorted(RULES))}); register it with @selection.rule")
  grid = cfg.grid_sizes[parent_scale]
  chex.assert_shape([parent_taken, parent_logits], (None, grid * grid))
  scores = upsample_to_children(parent_logits.astype(jnp.float32), grid)
  candidates = upsample_to_children(parent_taken, grid)
  wanted = RULES[name](candidates, scores, cfg, parent_scale + 1)
  chex.assert_equal_shape([wanted, candidates])
  return wanted & candidates, scores


def _row_capacity_slots(wanted: jax.Array, scores: jax.Array, capacity: int):
  """One row [N] of `capacity_slots`."""
  index = _row_top_indices(jnp.where(wanted, scores, NEG_INF), capacity)  # [C]
  count = wanted.sum(dtype=jnp.int32)
  valid = jnp.arange(capacity) < jnp.minimum(count, capacity)  # [C]
  taken = jnp.zeros(wanted.shape, bool).at[index].set(valid)  # [N]
  return index, valid, taken, count - valid.sum(dtype=jnp.int32)


def capacity_slots(wanted: jax.Array, scores: jax.Array, capacity: int):
  """Fits the wanted patches into `capacity` static slots, best scores first.

  Per sample (vmapped, see `topk_mask`): no collective with the batch sharded.
  Returns:
    index: [B, C] patch index held by each slot.
    valid: [B, C] bool, the slot holds a wanted patch (else it is padding).
    taken: [B, N] bool, wanted patches that got a slot.
    num_dropped: [B] int32, wanted patches left out for lack of slots.
  """
  chex.assert_equal_shape([wanted, scores])
  return jax.vmap(lambda w, x: _row_capacity_slots(w, x, capacity))(wanted, scores)


@flax.struct.dataclass
class Slots:
  """Which patches of a scale fill its `capacity` static slots, and the way back.

  index None: capacity is the patch count, every patch sits in its own slot (in place).
  """
  index: Optional[jax.Array]  # [B, C] patch index held by each slot
  valid: jax.Array            # [B, C] bool, the slot holds a wanted patch
  taken: jax.Array            # [B, N] bool, wanted patches that got a slot
  num_dropped: jax.Array      # [B] int32, wanted patches left out for lack of slots

  def to_grid(self, slot_values: jax.Array, fill: jax.Array) -> jax.Array:
    """Per-slot values [B, C] on the full grid [B, N]; `fill` [B, 1] where no slot is."""
    if self.index is None:
      return jnp.where(self.taken, slot_values, fill)
    b, n = self.taken.shape
    values = jnp.where(self.valid, slot_values, fill)  # [B, C]
    scatter = lambda f, idx, v: jnp.broadcast_to(f, (n,)).at[idx].set(v)  # noqa: E731
    return jax.vmap(scatter)(fill, self.index, values)  # Per sample: no collective.


def fill_slots(wanted: jax.Array, scores: Optional[jax.Array], capacity: int) -> Slots:
  """The slots of a scale with `wanted` [B, N] patches (scores [B, N]: priorities).

  scores may be None when capacity == N (nothing has to be chosen).
  """
  b, n = wanted.shape
  if capacity == n:  # Every wanted patch fits: keep the patches in place.
    return Slots(index=None, valid=wanted, taken=wanted,
                 num_dropped=jnp.zeros((b,), jnp.int32))
  index, valid, taken, dropped = capacity_slots(wanted, scores, capacity)
  return Slots(index=index, valid=valid, taken=taken, num_dropped=dropped)
