"""Training objective (DESIGN.md section 4), as a total plus a dict of named terms.

    total = sum_s w_s * (l1_weight * L1_s + giou_weight * (1 - GIoU_s))
          + ratio_weight * sum_{s>=1} mean_b (keep_{s,b} - target_ratio[s])^2
          + sum_heads weight_h * loss_h          (each exit head's term, exit_heads.py)
          + select_weight * sum_s mean_b BCE(logits_s, patch overlaps gt)   (optional)

Box terms average over valid samples only (rows with `valid=False` weigh nothing).
`keep_{s,b}` is the fraction of scale-s patches sample b took; in the dense training
path the taken masks are hard 0/1 with straight-through gradients, so the ratio term
trains the selection head.
"""

from __future__ import annotations

from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import optax

from scanformer_jax import box_ops, exit_heads
from scanformer_jax.config import LossConfig


def _masked_mean(x: jax.Array, weight: jax.Array) -> jax.Array:
  """Mean of `x [B]` over rows with weight 1 (0 when there are none)."""
  return jnp.sum(x * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def keep_ratios(taken: Sequence[jax.Array]) -> jax.Array:
  """Per-sample fraction of patches taken at every scale: tuple of [B, N_s] -> [B, S]."""
  return jnp.stack([t.astype(jnp.float32).mean(axis=-1) for t in taken], axis=-1)


def scale_weights(cfg: LossConfig, num_scales: int) -> tuple[float, ...]:
  weights = cfg.scale_weights or (1.0,) * num_scales
  if len(weights) != num_scales:
    raise ValueError(f"loss.scale_weights needs {num_scales} entries, got {weights}")
  return tuple(weights)


def box_losses(boxes: jax.Array, gt: jax.Array, valid: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-scale L1 (summed over the 4 coordinates), 1 - GIoU and IoU.

  boxes [B, S, 4] and gt [B, 4] in normalized cx, cy, w, h; valid [B].
  Returns (l1 [S], giou_loss [S], iou [B, S]); the first two are valid-sample means.
  """
  chex.assert_rank(boxes, 3)
  chex.assert_shape(gt, (boxes.shape[0], 4))
  gt = gt[:, None, :].astype(jnp.float32)  # [B, 1, 4]
  boxes = boxes.astype(jnp.float32)
  weight = valid.astype(jnp.float32)[:, None]  # [B, 1]
  l1 = jnp.abs(boxes - gt).sum(-1)  # [B, S]
  giou = box_ops.giou_cxcywh(boxes, gt)  # [B, S]
  iou = box_ops.iou_cxcywh(boxes, gt)  # [B, S]
  denom = jnp.maximum(weight.sum(), 1.0)
  return (l1 * weight).sum(0) / denom, ((1.0 - giou) * weight).sum(0) / denom, iou


def ratio_loss(keep: jax.Array, target: Sequence[float], valid: jax.Array) -> jax.Array:
  """sum_{s>=1} mean_b (keep[b, s] - target[s])^2; keep [B, S]."""
  chex.assert_rank(keep, 2)
  if len(target) != keep.shape[1]:
    raise ValueError(f"loss.target_ratio needs {keep.shape[1]} entries, got {tuple(target)}")
  sq = (keep - jnp.asarray(target, jnp.float32)[None]) ** 2  # [B, S]
  weight = valid.astype(jnp.float32)
  return sum(_masked_mean(sq[:, s], weight) for s in range(1, keep.shape[1]))


def patches_overlapping(box: jax.Array, grid: int) -> jax.Array:
  """[B, G*G] 0/1 (row-major grid): does patch (i, j) overlap the box [B, 4] cxcywh?"""
  x0, y0, x1, y1 = jnp.moveaxis(box_ops.cxcywh_to_xyxy(box.astype(jnp.float32)), -1, 0)
  edges = jnp.arange(grid, dtype=jnp.float32) / grid  # [G] cell starts
  cols = (edges[None] < x1[:, None]) & (edges[None] + 1.0 / grid > x0[:, None])  # [B, G]
  rows = (edges[None] < y1[:, None]) & (edges[None] + 1.0 / grid > y0[:, None])  # [B, G]
  return (rows[:, :, None] & cols[:, None, :]).reshape(box.shape[0], grid * grid)


def selection_losses(logits: Sequence[jax.Array], taken: Sequence[jax.Array], gt: jax.Array,
                     valid: jax.Array) -> list[jax.Array]:
  """Per scale: mean over taken patches of BCE(logit, patch overlaps the gt box).

  Replaced patches are left out: they all carry the constant token, so their logits
  cannot tell them apart (the mask is stop-gradient).
  """
  weight = valid.astype(jnp.float32)
  out = []
  for logit, mask in zip(logits, taken):
    grid = int(round(logit.shape[1] ** 0.5))
    target = patches_overlapping(gt, grid).astype(jnp.float32)  # [B, G*G]
    mask = jax.lax.stop_gradient(mask.astype(jnp.float32))  # [B, G*G]
    bce = optax.sigmoid_binary_cross_entropy(logit.astype(jnp.float32), target)  # [B, G*G]
    per_sample = (bce * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)  # [B]
    out.append(_masked_mean(per_sample, weight))
  return out


def scanformer_loss(out: Any, gt_box: jax.Array, valid: jax.Array, cfg: LossConfig
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training loss of one batch and its named terms (all scalars).

  `out` is the model output (boxes, taken, exit heads). Terms: `l1`, `giou` (summed
  over scales with w_s, unweighted by l1/giou weights), `l1_s{k}`, `giou_s{k}`,
  `ratio`, `exit_<name>` per exit head (its registry entry's loss, weighted by
  `loss.exit_head_weights` or the entry's weight), `keep_s{k}` (mean keep ratio, a
  metric) and `iou_s{k}` (mean IoU with the ground truth, a metric).
  """
  boxes = out.boxes  # [B, S, 4]
  num_scales = boxes.shape[1]
  weights = jnp.asarray(scale_weights(cfg, num_scales), jnp.float32)  # [S]
  l1, giou_loss, iou = box_losses(boxes, gt_box, valid)
  keep = keep_ratios(out.taken)  # [B, S]
  terms = {
      "l1": jnp.sum(weights * l1),
      "giou": jnp.sum(weights * giou_loss),
      "ratio": ratio_loss(keep, cfg.target_ratio, valid),
  }
  total = (cfg.l1_weight * terms["l1"] + cfg.giou_weight * terms["giou"]
           + cfg.ratio_weight * terms["ratio"])
  if cfg.select_weight:
    per_scale = selection_losses(out.selection_logits, out.taken, gt_box, valid)
    terms["select"] = sum(per_scale)
    terms.update({f"select_s{s}": v for s, v in enumerate(per_scale)})
    total = total + cfg.select_weight * terms["select"]
  targets = exit_heads.HeadTargets(boxes=boxes.astype(jnp.float32), iou=iou,
                                   gt_box=gt_box.astype(jnp.float32), valid=valid)
  for name, raw in getattr(out, "exit_heads", {}).items():  # One term per exit head.
    head = exit_heads.get(name)
    chex.assert_shape(raw, iou.shape + raw.shape[2:])
    terms[f"exit_{name}"] = head.loss(raw, targets)
    total = total + cfg.exit_head_weight(name, head.weight) * terms[f"exit_{name}"]
  weight = valid.astype(jnp.float32)
  for s in range(num_scales):
    terms[f"l1_s{s}"] = l1[s]
    terms[f"giou_s{s}"] = giou_loss[s]
    terms[f"keep_s{s}"] = _masked_mean(keep[:, s], weight)
    terms[f"iou_s{s}"] = _masked_mean(iou[:, s], weight)
  return total, terms
