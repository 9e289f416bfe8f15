"""The model on a batch, as per-sample rows: the one forward eval, the gallery, the
predictor and the benchmarks run.

`rows(cfg, params, batch, mode)` applies ScanFormer (sparse or dense inference) and
returns plain per-sample arrays, so callers never read the model's output structure:
boxes and per-scale counts for metrics and FLOPs, the exit heads' signals for
criteria, and (with `masks=True`) the taken masks for pictures. Pure: callers jit it
(and shard it: every row depends on its own sample only).
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from scanformer_jax import box_ops
from scanformer_jax.config import ModelConfig
from scanformer_jax.model import ScanFormer


def rows(cfg: ModelConfig, params: Any, batch: dict[str, jax.Array], mode: str = "sparse",
         masks: bool = False) -> dict[str, Any]:
  """Per-sample outputs of the forward on `batch` (image, text_ids, text_mask; `box`
  and `valid` when present):
    boxes [B, S, 4], taken / num_dropped / capacity [B, S] int32 (patches read, wanted
    beyond the slots, slots run), wanted_next [B, S] (fraction of scale s+1 wanted; 0
    at the last), text_len / text_len_run [B], the exit heads' signals [B, S] each;
    with a ground truth: iou [B, S] and gt_box [B, 4]; valid [B] when given;
    masks=True: taken_masks, per scale [B, N_s] bool.
  """
  out = ScanFormer(cfg).apply({"params": params}, batch["image"], batch["text_ids"],
                              batch["text_mask"], mode=mode)
  b, text_tokens = batch["text_ids"].shape
  chex.assert_shape(out.boxes, (b, cfg.num_scales, 4))
  taken = jnp.stack([t.sum(-1) for t in out.taken], axis=1).astype(jnp.int32)  # [B, S]
  result = {
      "boxes": out.boxes,
      "taken": taken,
      "num_dropped": out.num_dropped.astype(jnp.int32),
      "capacity": out.capacity.astype(jnp.int32),  # The row group's bucket.
      "text_len": batch["text_mask"].sum(-1).astype(jnp.int32),
      "text_len_run": jnp.full((b,), text_tokens, jnp.int32),  # Padded, as run.
  }
  wanted = taken + result["num_dropped"]  # [B, S] wanted patches per scale
  fractions = [wanted[:, s + 1] / n for s, n in enumerate(cfg.num_patches[1:])]
  result["wanted_next"] = jnp.stack(fractions + [jnp.zeros((b,))], axis=1)  # [B, S]
  result.update(out.signals)  # The exit heads' signals (halt_prob, ...) [B, S] each.
  if "box" in batch:
    result["iou"] = box_ops.iou_cxcywh(out.boxes, batch["box"][:, None, :])  # [B, S]
    result["gt_box"] = batch["box"]  # [B, 4], for the oracle only
  if "valid" in batch:
    result["valid"] = batch["valid"]
  if masks:
    result["taken_masks"] = tuple(t > 0.5 if t.dtype != bool else t for t in out.taken)
  return result
