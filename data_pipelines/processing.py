"""Per-sample work: raw sample -> contract row (decode, letterbox, augment, tokenize,
box and text checks), rows -> batches, and the single-image path of `predict`.

Everything here is plain numpy / PIL on one sample; `grain_ops` and `pipeline` run it
inside grain. Bad samples come back as `{"bad": reason}` (see `bad_input`), except in
the single-image path, which raises one `DataError` line naming the image.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Any, Sequence

import numpy as np
from PIL import Image

from data_pipelines import bad_input, images, transforms
from data_pipelines.bad_input import BadSample
from data_pipelines.contract import BAD_REASONS, PAD_ID
from data_pipelines.errors import DataError
from data_pipelines.tokenizer import Tokenizer
from data_pipelines.transforms import AugmentConfig

log = logging.getLogger("data_pipelines")
LOGGED_BAD_SAMPLES = 5

_META_DTYPES = {
    "expression": np.object_, "image_id": np.int64, "index": np.int64,
    "object_id": np.int64, "expr_id": np.int64, "orig_size": np.int32,
    "frame_size": np.int32, "scale": np.float32, "offset": np.float32,
    "flip": np.bool_, "box_orig": np.float32, "epoch": np.int32,
    "truncated": np.bool_, "skipped": np.int32, "skipped_prev": np.int32,
}


def _row_meta(raw: dict[str, Any], expression: str, size_hw: tuple[int, int],
              geom: transforms.Geometry | None, box: np.ndarray, frame: int,
              truncated: bool) -> dict[str, Any]:
  g = geom
  return {
      "expression": expression, "image_id": raw.get("image_id", -1),
      "index": raw.get("index", -1), "object_id": raw.get("object_id", -1),
      "expr_id": raw.get("expr_id", -1), "orig_size": np.array(size_hw, np.int32),
      "frame_size": frame,
      "scale": np.array([g.sx, g.sy] if g else [1, 1], np.float32),
      "offset": np.array([g.ox, g.oy] if g else [0, 0], np.float32),
      "flip": bool(g.flip) if g else False, "box_orig": np.asarray(box, np.float32),
      "epoch": raw.get("epoch", 0), "truncated": truncated,
      "skipped": np.zeros(len(BAD_REASONS), np.int32),
      "skipped_prev": np.zeros(len(BAD_REASONS), np.int32),
  }


class SampleProcessor:
  """raw sample -> one contract row; `{"bad": reason}` for a bad sample.

  With `augment` (training) it needs the per-sample rng that grain's random_map
  passes; without, it letterboxes the whole image. `tokenizer=None` skips text ids.
  The first LOGGED_BAD_SAMPLES bad samples (per copy: per worker) are logged with
  why they are bad; the pipelines count all of them per epoch.
  """

  def __init__(self, image_size: int, max_text_len: int, tokenizer: Tokenizer | None,
               augment: AugmentConfig | None = None):
    self.image_size = image_size
    self.max_text_len = max_text_len
    self.tokenizer = tokenizer
    self.augment = augment
    self._logged = 0

  def __call__(self, raw: dict[str, Any], rng: np.random.Generator | None = None):
    try:
      return self.process(raw, rng)
    except BadSample as e:
      if self._logged < LOGGED_BAD_SAMPLES:
        self._logged += 1
        log.warning("bad sample skipped (index %s, image_id %s): %s", raw.get("index", -1),
                    raw.get("image_id", -1), e)
      return {"bad": e.reason, "raw": {"index": raw.get("index", -1),
                                       "image_id": raw.get("image_id", -1),
                                       "epoch": raw.get("epoch", 0)}}

  def process(self, raw: dict[str, Any], rng: np.random.Generator | None) -> dict:
    r = self.image_size
    text = bad_input.check_expression(raw["expression"])
    img = images.open_image(raw["image"])
    width, height = img.size
    box = np.asarray(raw["box"], np.float64)
    if raw.get("box_format") == "yxyx_norm":
      box = transforms.yxyx_norm_to_xyxy(box, height, width)
    box = bad_input.check_box(box, width, height)
    aug = self.augment
    if aug is not None:
      geom = transforms.random_geometry(rng, width, height, box, r, aug)
    else:
      geom = transforms.letterbox_geometry(width, height, r)
    content = transforms.render(img, geom)
    if aug is not None and aug.jitter > 0:
      content = transforms.color_jitter(content, rng, aug.jitter)
    if geom.flip:
      text = transforms.swap_left_right(text)
    fbox = geom.apply(box)
    fbox = np.clip(fbox, 0, [geom.out_w, geom.out_h, geom.out_w, geom.out_h])
    if self.tokenizer is not None:
      ids, mask, truncated = self.tokenizer.encode(text)
    else:
      ids = np.full((self.max_text_len,), PAD_ID, np.int32)
      mask, truncated = np.zeros((self.max_text_len,), np.bool_), False
    return {
        # uint8 content only; `collate` normalizes it into the padded R x R frame.
        "pixels": np.asarray(content, np.uint8),  # [h, w, 3]
        "text_ids": ids, "text_mask": mask,  # [L]
        "box": transforms.xyxy_to_cxcywh(fbox / r).astype(np.float32),  # [4]
        "valid": True,
        "meta": _row_meta(raw, text, (height, width), geom, box, r, truncated),
    }


def pad_row(image_size: int, max_text_len: int, bad: dict | None = None) -> dict:
  """A valid=False row: eval padding, or (with `bad`) a bad eval sample."""
  r = image_size
  raw = dict(bad["raw"]) if bad else {}
  meta = _row_meta(raw, "", (0, 0), None, np.zeros(4), r, False)
  if bad:
    meta["skipped"][BAD_REASONS.index(bad["bad"])] = 1
  return {"pixels": np.zeros((0, 0, 3), np.uint8),
          "text_ids": np.full((max_text_len,), PAD_ID, np.int32),
          "text_mask": np.zeros((max_text_len,), np.bool_),
          "box": np.zeros((4,), np.float32), "valid": False, "meta": meta}


def collate(rows: Sequence[dict]) -> dict[str, Any]:
  """Stacks rows into a contract batch (meta: one numpy array per field).

  Images are normalized straight into the batch array (one pass over the pixels).
  """
  r = int(rows[0]["meta"]["frame_size"])
  image = np.zeros((len(rows), r, r, 3), np.float32)  # [B, R, R, 3]; PAD_VALUE is 0
  for i, row in enumerate(rows):
    transforms.normalize_into(image[i], row["pixels"])
  batch = {"image": image}
  batch.update({k: np.stack([row[k] for row in rows]) for k in ("text_ids", "text_mask", "box")})
  batch["valid"] = np.array([row["valid"] for row in rows], np.bool_)
  meta = {}
  for k, dtype in _META_DTYPES.items():
    if dtype is np.object_:
      arr = np.empty((len(rows),), np.object_)
      arr[:] = [row["meta"][k] for row in rows]
    else:
      arr = np.stack([np.asarray(row["meta"][k]) for row in rows]).astype(dtype)
    meta[k] = arr
  batch["meta"] = meta
  return batch


class EvalRow:
  """Eval map: a raw sample or a `{"pad": True}` marker -> a row (valid=False when
  padding or bad, the bad reason counted in meta.skipped)."""

  def __init__(self, proc: SampleProcessor):
    self.proc = proc

  def __call__(self, raw: dict) -> dict:
    if raw.get("pad"):
      return pad_row(self.proc.image_size, self.proc.max_text_len)
    row = self.proc(raw)
    if "bad" in row:
      return pad_row(self.proc.image_size, self.proc.max_text_len, bad=row)
    return row


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISSOCK, "a socket"))


def read_image_bytes(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
  """The bytes of the regular file `path`, at most `max_bytes` (default
  images.MAX_IMAGE_BYTES); one-line DataError otherwise.

  Only regular files: /dev/zero or a FIFO would be read (or waited on) forever.
  """
  limit = images.MAX_IMAGE_BYTES if max_bytes is None else int(max_bytes)
  data = b""
  try:
    st = os.stat(path)
    if stat.S_ISREG(st.st_mode) and st.st_size <= limit:
      # O_NONBLOCK: a FIFO swapped in after the stat cannot block the open.
      fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
      with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if stat.S_ISREG(st.st_mode):
          data = f.read(limit + 1)
  except FileNotFoundError:
    raise DataError(f"image not found: {path}: check the path") from None
  except OSError as e:
    raise DataError(f"cannot read image {path}: {e.strerror or e}") from None
  if not stat.S_ISREG(st.st_mode):
    kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a file")
    raise DataError(f"cannot read image {path}: it is {kind}, not a regular file; pass "
                    "an image file")
  size = max(st.st_size, len(data))
  if size > limit:
    raise DataError(f"image {path} is {size / 2**20:.1f} MB, more than the "
                    f"{limit / 2**20:g} MB limit; pass a smaller file (or raise the limit: "
                    "predict --max-image-mb)")
  return data


def load_image_file(path: str | os.PathLike, max_bytes: int | None = None) -> np.ndarray:
  """Reads an image file as upright uint8 [H, W, 3]; one-line DataError if bad
  (see `read_image_bytes` for what files are read)."""
  data = read_image_bytes(path, max_bytes)
  try:
    rgb = images.to_rgb(images.open_image(data))
  except BadSample as e:
    raise DataError(f"bad image {path}: {e.detail}; pass a JPEG or PNG photo") from None
  return np.asarray(rgb, np.uint8)  # [H, W, 3]


def preprocess_single(image: np.ndarray, text: str, tokenizer: Tokenizer,
                      image_size: int, max_len: int, *,
                      source: str = "the image") -> tuple[dict[str, Any], dict]:
  """One uint8 [H, W, 3] image + expression -> (B=1 batch, its meta).

  `source` (the image's path) names the input in the one-line DataError a bad image
  or an empty expression raises. Map the model's box back with
  `transforms.box_to_original_pixels(box[0], {k: v[0] for k, v in meta.items()})`
  or directly on the [1, 4] batch.
  """
  arr = np.asarray(image)
  if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
    raise DataError(f"{source}: expected a uint8 [H, W, 3] image, got {arr.dtype} "
                    f"{arr.shape}")
  h, w = arr.shape[:2]
  raw = {"image": Image.fromarray(arr), "expression": text, "box": [0.0, 0.0, w, h],
         "box_format": "xyxy"}
  try:
    row = SampleProcessor(image_size, max_len, tokenizer, None).process(raw, None)
  except BadSample as e:
    what = "the expression" if e.reason == "expression" else "the image"
    raise DataError(f"{source}: {what} is unusable: {e.detail}"
                    + ("; pass the words to ground with --text" if e.reason == "expression"
                       else "")) from None
  if row["meta"]["truncated"]:
    log.warning("the expression is longer than %d tokens and was truncated: %r", max_len,
                row["meta"]["expression"])
  batch = collate([row])
  batch["box"][:] = 0.0  # no ground truth
  batch["meta"]["box_orig"][:] = 0.0
  return batch, batch["meta"]
