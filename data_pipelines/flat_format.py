"""The record layout of OUR builders (synthetic, refer): one record per image.

Per-expression fields are parallel arrays, so images are stored once and every
feature encodes without TensorFlow (bytes and numpy tensors only):

  image        ()       bytes    the original encoded image (JPEG / PNG), unchanged
  image/id     ()       int64
  height,width ()       int64    original size in pixels
  expressions  [E]      str      one referring expression each
  boxes        [E, 4]   float32  target box (x0, y0, x1, y1) in original pixels
  object_ids   [E]      int64    id of the referred object (COCO annotation id;
                                 synthetic: object index in the scene)
  expr_ids     [E]      int64    source sentence id
"""

from __future__ import annotations

from typing import Any

import numpy as np


def features(**extra: Any):
  """The TFDS FeaturesDict of the flat layout plus builder-specific `extra`."""
  import tensorflow_datasets as tfds
  t = tfds.features.Tensor
  return tfds.features.FeaturesDict({
      "image": t(shape=(), dtype=np.object_),
      "image/id": np.int64,
      "height": np.int64,
      "width": np.int64,
      "expressions": t(shape=(None,), dtype=np.object_),
      "boxes": t(shape=(None, 4), dtype=np.float32),
      "object_ids": t(shape=(None,), dtype=np.int64),
      "expr_ids": t(shape=(None,), dtype=np.int64),
      **extra,
  })


def num_expressions(record: dict[str, Any]) -> list[int]:
  """Expressions per object for `flatten` indices (flat: one 'object' each)."""
  return [1] * len(record["expressions"])


def sample(record: dict[str, Any], obj: int, expr: int) -> dict[str, Any]:
  """The raw sample of expression `obj` (expr is always 0 in this layout)."""
  del expr
  return {
      "image": record["image"],
      "expression": _text(record["expressions"][obj]),
      "box": np.asarray(record["boxes"][obj], np.float64),
      "box_format": "xyxy",
      "image_id": int(record["image/id"]),
      "object_id": int(record["object_ids"][obj]),
      "expr_id": int(record["expr_ids"][obj]),
  }


def _text(x: Any) -> str:
  return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)
