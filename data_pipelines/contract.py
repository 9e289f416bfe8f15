"""The batch contract between the host pipeline and the model / trainer.

Every pipeline (train, eval, single-image predict) yields a dict of numpy arrays
with fixed shapes (B rows, frame side R = the finest model scale, L text tokens):

  image      [B, R, R, 3] float32  letterboxed: aspect kept, image at the TOP-LEFT
                                   corner, padding right/bottom; normalized as ViLT
                                   (x / 255 - 0.5) / 0.5, padding 0 after normalizing.
  text_ids   [B, L] int32          [CLS] tokens [SEP] then 0 ([PAD]).
  text_mask  [B, L] bool           True on real tokens.
  box        [B, 4] float32        target (cx, cy, w, h) normalized by R in the frame.
  valid      [B] bool              False on padding rows (eval only).
  meta       dict[str, np.ndarray] host-side metadata, one row per sample (below).

`meta` never goes to the device (pop it before `jax.device_put`). Its arrays:

  expression   [B] object(str)  the expression as tokenized (after any flip swap).
  image_id     [B] int64        source image id (-1 on padding rows).
  index        [B] int64        sample position in the flattened split (-1: padding).
  object_id    [B] int64        referred object: COCO annotation id (synthetic: index
                                in the scene; -1 on padding rows).
  expr_id      [B] int64        source sentence id (-1 on padding rows).
  orig_size    [B, 2] int32     original image (height, width) in pixels.
  frame_size   [B] int32        R.
  scale        [B, 2] float32   (sx, sy) > 0: original px -> frame px scale.
  offset       [B, 2] float32   (ox, oy): frame_x = (-1 if flip else 1)*sx*x + ox,
                                frame_y = sy*y + oy (x, y in original pixels).
  flip         [B] bool         horizontally mirrored (training augmentation).
  box_orig     [B, 4] float32   ground-truth box (x0, y0, x1, y1) in original px.
  epoch        [B] int32        epoch this row was drawn from (training).
  truncated    [B] bool         expression was cut to L tokens.
  skipped      [B, 3] int32     bad samples skipped just before this row, by reason
                                (columns: BAD_REASONS); eval counts the row itself.
  skipped_prev [B, 3] int32     same, for skipped samples of the previous epoch.

`data_pipelines.transforms.box_to_original_pixels(box, meta)` maps predicted boxes
back to original pixels with `scale`, `offset` and `flip`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# ViLT / BERT normalization: (x / 255 - MEAN) / STD per channel.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5
# Value of padding pixels after normalization (grey 127.5 in uint8 terms).
PAD_VALUE = 0.0
# Token id of [PAD] in every vocab we use (BERT layout).
PAD_ID = 0

# Why a sample was skipped; the column order of `meta["skipped"]`.
BAD_REASONS = ("image", "expression", "box")

DEVICE_KEYS = ("image", "text_ids", "text_mask", "box", "valid")


def check_batch(batch: dict[str, Any], batch_size: int, image_size: int,
                max_text_len: int) -> None:
  """Raises AssertionError unless `batch` follows the contract exactly."""
  b, r, l = batch_size, image_size, max_text_len
  want = {
      "image": ((b, r, r, 3), np.float32),
      "text_ids": ((b, l), np.int32),
      "text_mask": ((b, l), np.bool_),
      "box": ((b, 4), np.float32),
      "valid": ((b,), np.bool_),
  }
  for key, (shape, dtype) in want.items():
    arr = batch[key]
    assert isinstance(arr, np.ndarray), (key, type(arr))
    assert arr.shape == shape, (key, arr.shape, shape)
    assert arr.dtype == dtype, (key, arr.dtype, dtype)
  for key, arr in batch["meta"].items():
    assert len(arr) == b, (key, len(arr), b)
