"""Image and box transforms on the host (numpy / PIL): letterbox, augment, map back.

Coordinates: boxes are (x0, y0, x1, y1) in pixels unless named `cxcywh`. The model
frame is R x R; the (possibly cropped) image is resized with its aspect kept so its
longer side fits R and placed at the TOP-LEFT corner; the rest is padding. A
`Geometry` records the affine map original px -> frame px so any box in the frame
maps back (`box_to_original_pixels`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np
from PIL import Image

from data_pipelines import images
from data_pipelines.bad_input import BadSample
from data_pipelines.contract import PAD_VALUE, PIXEL_MEAN, PIXEL_STD


# ----------------------------------------------------------------------------- boxes
def xyxy_to_cxcywh(box: np.ndarray) -> np.ndarray:
  box = np.asarray(box, np.float32)
  x0, y0, x1, y1 = np.moveaxis(box, -1, 0)
  return np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def cxcywh_to_xyxy(box: np.ndarray) -> np.ndarray:
  box = np.asarray(box, np.float32)
  cx, cy, w, h = np.moveaxis(box, -1, 0)
  return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def yxyx_norm_to_xyxy(box: np.ndarray, height: int, width: int) -> np.ndarray:
  """TFDS BBox (ymin, xmin, ymax, xmax) normalized -> pixel (x0, y0, x1, y1)."""
  ymin, xmin, ymax, xmax = np.moveaxis(np.asarray(box, np.float64), -1, 0)
  return np.stack([xmin * width, ymin * height, xmax * width, ymax * height], axis=-1)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """frame_x = (-1 if flip else 1) * sx * x + ox;  frame_y = sy * y + oy."""
  sx: float
  sy: float
  ox: float
  oy: float
  flip: bool
  out_w: int  # width of the image content in the frame (px)
  out_h: int
  crop: tuple[float, float, float, float]  # source window, original px (x0,y0,x1,y1)

  def apply(self, box_xyxy: np.ndarray) -> np.ndarray:
    """Original-pixel box -> frame-pixel box (x0 <= x1 kept)."""
    x0, y0, x1, y1 = np.asarray(box_xyxy, np.float64)
    s = -self.sx if self.flip else self.sx
    xs = sorted([s * x0 + self.ox, s * x1 + self.ox])
    return np.array([xs[0], self.sy * y0 + self.oy, xs[1], self.sy * y1 + self.oy])


def letterbox_geometry(width: int, height: int, frame: int,
                       crop: tuple[float, float, float, float] | None = None,
                       zoom: float = 1.0, flip: bool = False) -> Geometry:
  """Fits `crop` (default: the whole image) into the frame, aspect kept."""
  cx0, cy0, cx1, cy1 = crop if crop is not None else (0.0, 0.0, float(width), float(height))
  cw, ch = cx1 - cx0, cy1 - cy0
  s = zoom * frame / max(cw, ch)
  out_w = int(min(frame, max(1, round(cw * s))))
  out_h = int(min(frame, max(1, round(ch * s))))
  sx, sy = out_w / cw, out_h / ch
  ox = out_w + sx * cx0 if flip else -sx * cx0
  return Geometry(sx=sx, sy=sy, ox=ox, oy=-sy * cy0, flip=flip, out_w=out_w,
                  out_h=out_h, crop=(cx0, cy0, cx1, cy1))


def box_to_original_pixels(box_cxcywh: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
  """Normalized frame boxes (cx, cy, w, h) -> original-pixel (x0, y0, x1, y1).

  Works on one row (`box [4]`, meta of that row) or a batch (`box [B, 4]`, the
  batch's `meta`); clips to the original image.
  """
  box = np.asarray(box_cxcywh, np.float64)
  r = np.asarray(meta["frame_size"], np.float64)[..., None]
  x0, y0, x1, y1 = np.moveaxis(cxcywh_to_xyxy(box).astype(np.float64) * r, -1, 0)
  scale = np.asarray(meta["scale"], np.float64)
  offset = np.asarray(meta["offset"], np.float64)
  sign = np.where(np.asarray(meta["flip"]), -1.0, 1.0)
  sx, sy = scale[..., 0] * sign, scale[..., 1]
  ox, oy = offset[..., 0], offset[..., 1]
  ax, bx = (x0 - ox) / sx, (x1 - ox) / sx
  ay, by = (y0 - oy) / sy, (y1 - oy) / sy
  h = np.asarray(meta["orig_size"], np.float64)[..., 0]
  w = np.asarray(meta["orig_size"], np.float64)[..., 1]
  out = np.stack([np.clip(np.minimum(ax, bx), 0, w), np.clip(np.minimum(ay, by), 0, h),
                  np.clip(np.maximum(ax, bx), 0, w), np.clip(np.maximum(ay, by), 0, h)],
                 axis=-1)
  return out.astype(np.float32)


# ---------------------------------------------------------------------------- images
def render(img: Image.Image, geom: Geometry) -> Image.Image:
  """Crops, resizes and flips `img` (from `images.open_image`) as `geom` says -> RGB
  image out_w x out_h (any PIL mode, decoded by `images.to_rgb`)."""
  width, height = img.size
  try:
    # JPEG can decode at 1/2, 1/4, 1/8 size directly: much faster when shrinking.
    if img.format == "JPEG":
      img.draft("RGB", (max(1, int(width * geom.sx)), max(1, int(height * geom.sy))))
  except Exception as e:  # pylint: disable=broad-except
    raise BadSample("image", f"cannot decode image: {e}") from None
  img = images.to_rgb(img)
  fx, fy = img.size[0] / width, img.size[1] / height  # draft reduction
  x0, y0, x1, y1 = geom.crop
  out = img.resize((geom.out_w, geom.out_h), Image.BILINEAR,
                   box=(x0 * fx, y0 * fy, x1 * fx, y1 * fy))
  if geom.flip:
    out = out.transpose(Image.FLIP_LEFT_RIGHT)
  return out


_LUMA = np.array([0.299, 0.587, 0.114])


def color_jitter(img: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
  """Mild brightness / contrast / saturation jitter (no hue: colours are words).

  brightness b, contrast c (around the mean grey level m), saturation s (around the
  luma) compose to one affine colour map p -> c*b*A p + (1-c)*b*m, applied by PIL.
  """
  b, c, s = rng.uniform(1 - strength, 1 + strength, size=3)
  m = float(np.asarray(img)[::2, ::2].mean())  # mean grey level (subsampled)
  a = s * np.eye(3) + (1 - s) * _LUMA[None, :]  # [3, 3] saturation
  mat = np.concatenate([c * b * a, np.full((3, 1), (1 - c) * b * m)], axis=1)  # [3, 4]
  return img.convert("RGB", tuple(float(v) for v in mat.ravel()))


def normalize_into(out: np.ndarray, pixels: np.ndarray) -> None:
  """Writes uint8 [h, w, 3] pixels, normalized, into the top-left of `out` [R, R, 3]
  (which holds PAD_VALUE elsewhere)."""
  h, w = pixels.shape[:2]
  # (A ufunc with out= and a uint8 -> float32 cast is ~10x slower than this.)
  out[:h, :w] = (pixels.astype(np.float32) * np.float32(1.0 / (255 * PIXEL_STD))
                 - np.float32(PIXEL_MEAN / PIXEL_STD))


def to_frame(pixels: np.ndarray, frame: int) -> np.ndarray:
  """uint8 [h, w, 3] pixels -> normalized float32 [R, R, 3], top-left, padded."""
  out = np.full((frame, frame, 3), PAD_VALUE, np.float32)  # [R, R, 3]
  normalize_into(out, np.asarray(pixels, np.uint8))
  return out


def denormalize(image: np.ndarray) -> np.ndarray:
  """Normalized float frame -> uint8 pixels (for drawing / inspection)."""
  return np.clip((image * PIXEL_STD + PIXEL_MEAN) * 255 + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- words
_LR = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
_LR_RE = re.compile(r"\b(" + "|".join(sorted(_LR, key=len, reverse=True)) + r")\b",
                    re.IGNORECASE)


def swap_left_right(text: str) -> str:
  """'the cup left of the man' -> 'the cup right of the man' (case kept)."""

  def repl(m: re.Match) -> str:
    word = m.group(0)
    new = _LR[word.lower()]
    if word.isupper():
      return new.upper()
    if word[0].isupper():
      return new.capitalize()
    return new

  return _LR_RE.sub(repl, text)


# ---------------------------------------------------------------------- augmentation
@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Training augmentation; every draw comes from the per-sample seeded rng."""
  crop_prob: float = 0.5  # probability of a random crop that keeps the box
  min_crop: float = 0.6  # crop side >= this fraction of the image side
  zoom_prob: float = 0.3  # probability of shrinking the image inside the frame
  min_zoom: float = 0.7
  flip_prob: float = 0.5  # horizontal flip (left/right words swapped)
  jitter: float = 0.2  # colour jitter strength (0 = off)


NO_AUGMENT = AugmentConfig(crop_prob=0.0, zoom_prob=0.0, flip_prob=0.0, jitter=0.0)


def _uniform_between(rng: np.random.Generator, lo: float, hi: float) -> float:
  """Uniform in [lo, hi]; lo when float rounding made the interval empty."""
  return float(rng.uniform(lo, hi)) if hi > lo else float(lo)


def random_geometry(rng: np.random.Generator, width: int, height: int,
                    box_xyxy: np.ndarray, frame: int, cfg: AugmentConfig) -> Geometry:
  """Random crop (containing the whole box), zoom and flip."""
  bx0, by0, bx1, by1 = np.asarray(box_xyxy, np.float64)
  crop = (0.0, 0.0, float(width), float(height))
  if rng.random() < cfg.crop_prob:
    f = rng.uniform(cfg.min_crop, 1.0)
    fw = f * rng.uniform(0.9, 1.1)
    fh = f * rng.uniform(0.9, 1.1)
    cw = min(width, max(fw * width, bx1 - bx0))
    ch = min(height, max(fh * height, by1 - by0))
    cx0 = _uniform_between(rng, max(0.0, bx1 - cw), min(bx0, width - cw))
    cy0 = _uniform_between(rng, max(0.0, by1 - ch), min(by0, height - ch))
    crop = (cx0, cy0, cx0 + cw, cy0 + ch)
  zoom = rng.uniform(cfg.min_zoom, 1.0) if rng.random() < cfg.zoom_prob else 1.0
  flip = bool(rng.random() < cfg.flip_prob)
  return letterbox_geometry(width, height, frame, crop=crop, zoom=zoom, flip=flip)
