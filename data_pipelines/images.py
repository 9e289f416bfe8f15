"""Encoded image -> upright RGB: every PIL mode, EXIF orientation, size limits.

A bad image raises `BadSample("image", why)` (skipped and counted by the pipelines,
a one-line `DataError` in `predict`); nothing is silently altered:

  - zero-byte, undecodable or truncated data;
  - fewer than MIN_IMAGE_SIDE pixels on a side (e.g. 1x1: nothing to ground);
  - more than MAX_IMAGE_PIXELS pixels (checked on the header, before decoding;
    PIL's DecompressionBombError gets the same answer);
  - unreadable EXIF data, or non-finite pixels in a float (F) image.

Modes: 1, L, P, RGB, CMYK, YCbCr, LAB, HSV convert with PIL. Alpha (LA, PA, RGBA,
RGBa, P with transparency) is dropped, not composited: the colours stay as stored,
so a colour word still names the colour the annotator saw on an opaque viewer, and
no background colour is invented. 16-bit modes (I;16, I;16B, I;16L, I;16N) scale by
their range, v * 255 / 65535. Mode I (32-bit) holds 16-bit data in PNG / TIFF files
as PIL opens them: values in 0..65535 scale like 16-bit, anything else is stretched
from its min..max. Mode F: values in [0, 1] scale by 255, anything else is stretched.
EXIF orientation is applied (`ImageOps.exif_transpose`), so sizes and boxes refer to
the image as viewers show it.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data_pipelines.bad_input import BadSample

# 8000 x 8000: above any photo we ground on, below PIL's decompression-bomb warning.
MAX_IMAGE_PIXELS = 64_000_000
# Largest image file read from disk (predict's --max-image-mb): a JPEG of
# MAX_IMAGE_PIXELS is far smaller, so anything above is not a photo to ground on.
MAX_IMAGE_BYTES = 64 * 2**20
MIN_IMAGE_SIDE = 8
_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")


def check_size(width: int, height: int) -> None:
  if min(width, height) < MIN_IMAGE_SIDE:
    raise BadSample("image", f"image too small ({width}x{height} px; need at least "
                    f"{MIN_IMAGE_SIDE} px per side)")
  if width * height > MAX_IMAGE_PIXELS:
    raise BadSample("image", f"image too large ({width}x{height} = {width * height} "
                    f"pixels; the limit is MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS})")


def open_image(data: bytes | Image.Image) -> Image.Image:
  """Opens encoded bytes (header only, unless EXIF says rotate) and checks the size."""
  if isinstance(data, Image.Image):
    img = data
  else:
    if not data:
      raise BadSample("image", "zero-byte image")
    try:
      img = Image.open(io.BytesIO(data))
      img.size  # noqa: B018 -- header parsed
    except Image.DecompressionBombError as e:
      raise BadSample("image", f"image too large: {e}") from None
    except UnidentifiedImageError:
      raise BadSample("image", "cannot open image: not in an image format PIL can decode "
                      "(SVG, text and PDF files are not images here)") from None
    except Exception as e:  # PIL raises many types for garbage input
      raise BadSample("image", f"cannot open image: {_plain_message(e)}") from None
  check_size(*img.size)
  return _upright(img)


def _plain_message(error: Exception) -> str:
  """PIL's message without the repr of our in-memory file (`<_io.BytesIO ...>`)."""
  return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error)) or type(
      error).__name__


def _upright(img: Image.Image) -> Image.Image:
  try:  # (PNG keeps EXIF after the pixels: reading it decodes the image)
    orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
  except Exception as e:  # pylint: disable=broad-except
    raise BadSample("image", f"cannot decode image or its EXIF data: {e}") from None
  if orientation in (1, None):
    return img  # still lazy: JPEG can decode straight to a reduced size (`draft`)
  try:
    return ImageOps.exif_transpose(img)
  except Exception as e:  # pylint: disable=broad-except
    raise BadSample("image", f"cannot decode image: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
  """Decodes `img` to 8-bit RGB (see the module docstring for each mode)."""
  try:
    img.load()
    if img.mode == "RGB":
      return img
    if img.mode in _ALPHA or (img.mode == "P" and "transparency" in img.info):
      rgba = img.convert("RGBA") if img.mode in ("La", "PA", "P") else img
      return rgba.convert("RGB")  # drops alpha
    if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):
      return _deep_to_rgb(img)
    return img.convert("RGB")
  except BadSample:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise BadSample("image", f"cannot decode image: {e}") from None


def _deep_to_rgb(img: Image.Image) -> Image.Image:
  """16-bit, 32-bit integer or float grey -> 8-bit RGB, scaled by range."""
  arr = np.asarray(img).astype(np.float64)  # [H, W]
  if img.mode == "F" and not np.all(np.isfinite(arr)):
    raise BadSample("image", "float image with non-finite pixel values")
  lo, hi = float(arr.min()), float(arr.max())
  if img.mode in _SIXTEEN_BIT or (img.mode == "I" and lo >= 0 and hi <= 65535):
    arr = arr * (255 / 65535)
  elif img.mode == "F" and lo >= 0 and hi <= 1:
    arr = arr * 255
  else:
    arr = (arr - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(arr)
  grey = np.clip(np.round(arr), 0, 255).astype(np.uint8)
  return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))  # [H, W, 3]
