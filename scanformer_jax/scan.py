"""The scan loop, written once: every path is this loop with its own decisions.

`scan(policy, images, cache)` runs the scales coarse to fine. At each scale the
policy runs the model's step for that scale (`policy.run`), the loop appends the
block's keys/values to the cache (every later scale attends to them), and the policy
decides what the next scale takes (`policy.next`). The paths differ only in their
policy:
  DensePolicy        every patch a token, replaced patches masked (training: the
                     training rule's decisions; inference: the selection rule);
  SparsePolicy       inference: the wanted patches in capacity slots (buckets), the
                     rest merged into one token;
  SparseTrainPolicy  training: the training rule's decisions in static slots, with
                     the dense path's gradients (model.py);
  ExitPolicy         (exit_scan.py) inference where samples stop early and the ones
                     still scanning are compacted into smaller sub-batches.
A fork's new path is one policy; the loop and the per-scale steps stay as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from scanformer_jax import selection
from scanformer_jax.kv_cache import KVCache


class ScanPolicy:
  """A path's decisions; `state` is whatever the path carries from scale to scale."""

  def first(self, batch: int) -> Any:
    """The state of scale 0 (every patch is read there)."""
    raise NotImplementedError

  def run(self, s: int, image: jax.Array, state: Any, cache: KVCache) -> Any:
    """Scale s of the pyramid (`image` [B, r_s, r_s, 3]) against `cache`: an output
    with `kv`, the block's keys/values for the cache (`model.ScaleOutput`)."""
    raise NotImplementedError

  def next(self, s: int, out: Any, state: Any) -> Any:
    """The state of scale s+1 from scale s's output."""
    raise NotImplementedError


def scan(policy: ScanPolicy, images: Sequence[jax.Array], cache: KVCache
         ) -> tuple[list, Any]:
  """Runs `policy` over pyramid levels `images` (scales 0.., a prefix allowed) from the
  text's `cache`; returns (each scale's output, the state the last scale ran with)."""
  state = policy.first(images[0].shape[0])
  outs = []
  for s, image in enumerate(images):
    out = policy.run(s, image, state, cache)
    outs.append(out)
    if s == len(images) - 1:  # The last scale's keys/values are never attended to.
      break
    cache = cache.append(out.kv)
    state = policy.next(s, out, state)
  return outs, state


def _train_children(model, s: int, out, rng: jax.Array) -> jax.Array:
  """[B, N_{s+1}] float: children of the patches scale s took and decided to expand
  (the training rule's straight-through decisions; the same noise on every path)."""
  cfg = model.cfg
  decide = selection.train_decisions(cfg, s, out.selection_logits, jax.random.fold_in(rng, s))
  return selection.upsample_to_children(out.taken * decide, cfg.grid_sizes[s])


@dataclasses.dataclass(frozen=True)
class DensePolicy(ScanPolicy):
  """Every patch is a token; state: the taken mask [B, N_s] float 0/1.

  rng: the training rule's noise (None: inference, the selection rule decides).
  force_taken: per-scale [B, N_s] masks used instead of the model's decisions.
  """
  model: Any
  rng: Optional[jax.Array] = None
  force_taken: Optional[tuple[jax.Array, ...]] = None

  def first(self, batch):
    return jnp.ones((batch, self.model.cfg.num_patches[0]), jnp.float32)

  def run(self, s, image, mask, cache):
    if self.force_taken is not None:
      mask = self.force_taken[s].astype(jnp.float32)
    out = self.model.scan_scale_dense(s, image, mask, cache)
    return out if self.rng is not None else out.replace(taken=mask > 0.5)

  def next(self, s, out, mask):
    if self.rng is not None:
      return _train_children(self.model, s, out, self.rng)
    wanted, _ = selection.wanted_children(self.model.cfg, s, out.taken, out.selection_logits)
    return wanted.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class SparsePolicy(ScanPolicy):
  """Inference: the wanted patches in slots; state: (wanted [B, N_s] bool, scores
  [B, N_s] float32 priorities, None at scale 0)."""
  model: Any

  def first(self, batch):
    return jnp.ones((batch, self.model.cfg.num_patches[0]), bool), None

  def run(self, s, image, state, cache):
    wanted, scores = state
    return self.model.scan_scale_inference(s, image, wanted, scores, cache)

  def next(self, s, out, state):
    return selection.wanted_children(self.model.cfg, s, out.taken, out.selection_logits)


@dataclasses.dataclass(frozen=True)
class SparseTrainPolicy(ScanPolicy):
  """Training in `slots[s]` static slots per scale with the dense path's decisions
  (same rng folding: the same noise takes the same patches); state: (mask [B, N_s]
  float, scores [B, N_s] priorities when more are taken than fit)."""
  model: Any
  rng: jax.Array
  slots: tuple[int, ...]

  def first(self, batch):
    return jnp.ones((batch, self.model.cfg.num_patches[0]), jnp.float32), None

  def run(self, s, image, state, cache):
    mask, scores = state
    return self.model.scan_scale_sparse_train(s, image, mask, scores, cache, self.slots[s])

  def next(self, s, out, state):
    grid = self.model.cfg.grid_sizes[s]
    # Over capacity, the children of the lowest parent logits go first (as at inference).
    scores = selection.upsample_to_children(out.selection_logits.astype(jnp.float32), grid)
    return _train_children(self.model, s, out, self.rng), scores
