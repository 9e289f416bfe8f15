"""Box conversions, IoU and generalized IoU in jnp (boxes in the last axis, size 4).

The model predicts normalized `(cx, cy, w, h)`; IoU is computed in corner form
`(x0, y0, x1, y1)`. Everything broadcasts over leading axes, so the same functions
score `[B, 4]` against `[B, 4]` and `[B, S, 4]` against `[B, 1, 4]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Keeps IoU/GIoU finite for degenerate (zero-area) boxes.
_EPS = 1e-7


def cxcywh_to_xyxy(box: jax.Array) -> jax.Array:
  cx, cy, w, h = jnp.moveaxis(box, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(box: jax.Array) -> jax.Array:
  x0, y0, x1, y1 = jnp.moveaxis(box, -1, 0)
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def _area(xyxy: jax.Array) -> jax.Array:
  return (jnp.clip(xyxy[..., 2] - xyxy[..., 0], 0) *
          jnp.clip(xyxy[..., 3] - xyxy[..., 1], 0))


def _iou_and_union(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  top_left = jnp.maximum(a[..., :2], b[..., :2])
  bottom_right = jnp.minimum(a[..., 2:], b[..., 2:])
  inter = jnp.prod(jnp.clip(bottom_right - top_left, 0), axis=-1)
  union = _area(a) + _area(b) - inter
  return inter / (union + _EPS), union


def iou_xyxy(a: jax.Array, b: jax.Array) -> jax.Array:
  """Elementwise IoU of corner boxes `[..., 4]` -> `[...]`."""
  return _iou_and_union(a, b)[0]


def giou_xyxy(a: jax.Array, b: jax.Array) -> jax.Array:
  """Elementwise generalized IoU (Rezatofighi et al. 2019) of corner boxes, in [-1, 1]."""
  iou, union = _iou_and_union(a, b)
  hull = (jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]))
  hull_area = jnp.prod(jnp.clip(hull, 0), axis=-1)
  return iou - (hull_area - union) / (hull_area + _EPS)


def iou_cxcywh(a: jax.Array, b: jax.Array) -> jax.Array:
  return iou_xyxy(cxcywh_to_xyxy(a), cxcywh_to_xyxy(b))


def giou_cxcywh(a: jax.Array, b: jax.Array) -> jax.Array:
  return giou_xyxy(cxcywh_to_xyxy(a), cxcywh_to_xyxy(b))
