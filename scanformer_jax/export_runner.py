"""Runs a `scanformer export` artifact with jax, numpy, tokenizers and Pillow only.

`scanformer export` copies this file into the artifact as `run_exported.py`:

    python DIR/run_exported.py --image photo.jpg --text "the dog on the left"

prints one JSON line with the fields of a `scanformer predict` line (`box` in the
upright image's pixels, `boxes_per_scale`, `keep_ratio`, `truncated`, `pred_iou`
with the IoU head). It imports nothing of scanformer_jax or data_pipelines: the
preprocessing (EXIF upright, letterbox, normalization, BERT word pieces) is restated
here from the numbers in `export.json`, so the artifact runs anywhere jax does.
`scanformer_jax.load(DIR)` uses this same module.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import unicodedata

import numpy as np
from PIL import Image, ImageOps

SPEC_FILE = "export.json"
PROGRAM_FILE = "model.stablehlo"
PARAMS_FILE = "params.npz"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1
MIN_IMAGE_SIDE = 8
MAX_IMAGE_PIXELS = 64_000_000


class InputError(ValueError):
  """A bad image or expression: one line for the user."""


def clean_expression(text: str) -> str:
  """Whitespace collapsed, control / zero-width characters dropped (as the pipelines)."""
  kept = "".join(c for c in str(text)
                 if c.isspace() or unicodedata.category(c) not in ("Cc", "Cf"))
  text = " ".join(kept.split())
  if not text:
    raise InputError("empty expression: give the words that name the object")
  return text


def read_image(image) -> np.ndarray:
  """A path, PIL image or uint8 [H, W, 3] array -> upright uint8 [H, W, 3] (RGB)."""
  if isinstance(image, np.ndarray):
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
      raise InputError(f"expected a uint8 [H, W, 3] array, got {image.dtype} {image.shape}")
    arr = image
  else:
    try:
      img = Image.open(image) if isinstance(image, (str, os.PathLike)) else image
      w, h = img.size
      if w * h > MAX_IMAGE_PIXELS:
        raise InputError(f"image too large ({w}x{h} px)")
      img = ImageOps.exif_transpose(img)
      if img.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        img = img.convert("RGBA")
      arr = np.asarray(img.convert("RGB"), np.uint8)
    except FileNotFoundError:
      raise InputError(f"image not found: {image}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      raise InputError(f"cannot read image: {e}") from None
  if min(arr.shape[:2]) < MIN_IMAGE_SIDE:
    raise InputError(f"image too small ({arr.shape[1]}x{arr.shape[0]} px)")
  return arr


class ExportedModel:
  """An export directory loaded: `predict_batch(images, texts)` -> one dict each."""

  def __init__(self, model_dir: str):
    import jax  # pylint: disable=g-import-not-at-top
    from jax import export as jax_export  # pylint: disable=g-import-not-at-top
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    self.model_dir = model_dir
    with open(os.path.join(model_dir, SPEC_FILE), encoding="utf-8") as f:
      self.spec = json.load(f)
    if self.spec.get("format") != FORMAT_VERSION:
      raise InputError(f"{model_dir}: export format {self.spec.get('format')} is not "
                       f"{FORMAT_VERSION}")
    with open(os.path.join(model_dir, PROGRAM_FILE), "rb") as f:
      self.exported = jax_export.deserialize(bytearray(f.read()))
    with np.load(os.path.join(model_dir, PARAMS_FILE)) as npz:
      self.params = [jax.device_put(npz[k]) for k in sorted(npz.files)]
    self.tokenizer = Tokenizer.from_file(os.path.join(model_dir, TOKENIZER_FILE))
    self.batch_size = self.spec["batch_size"]  # None: any batch size

  # ---------------------------------------------------------------- preprocessing
  def encode(self, text: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """[CLS] word pieces [SEP], padded to max_text_len: (ids [L], mask [L], truncated)."""
    s = self.spec
    pieces = self.tokenizer.encode(text, add_special_tokens=False).ids
    room = s["max_text_len"] - 2
    ids = [s["cls_id"]] + pieces[:room] + [s["sep_id"]]
    out = np.full((s["max_text_len"],), s["pad_id"], np.int32)  # [L]
    out[:len(ids)] = ids
    mask = np.zeros((s["max_text_len"],), np.bool_)  # [L]
    mask[:len(ids)] = True
    return out, mask, len(pieces) > room

  def letterbox(self, arr: np.ndarray) -> tuple[np.ndarray, dict]:
    """uint8 [H, W, 3] -> normalized float32 [R, R, 3] frame (top-left) and its geometry."""
    r = self.spec["image_size"]
    h, w = arr.shape[:2]
    s = r / max(w, h)
    out_w, out_h = int(min(r, max(1, round(w * s)))), int(min(r, max(1, round(h * s))))
    pixels = np.asarray(Image.fromarray(arr).resize((out_w, out_h), Image.BILINEAR,
                                                    box=(0.0, 0.0, float(w), float(h))))
    frame = np.full((r, r, 3), self.spec["pad_value"], np.float32)  # [R, R, 3]
    std, mean = np.float32(self.spec["pixel_std"]), np.float32(self.spec["pixel_mean"])
    frame[:out_h, :out_w] = (pixels.astype(np.float32) * np.float32(1.0 / (255 * std))
                             - np.float32(mean / std))
    return frame, {"orig_size": (h, w), "scale": (out_w / w, out_h / h), "frame_size": r}

  @staticmethod
  def to_pixels(boxes: np.ndarray, geom: dict) -> np.ndarray:
    """Normalized frame (cx, cy, w, h) [S, 4] -> upright-image (x0, y0, x1, y1) px."""
    b = np.asarray(boxes, np.float64) * geom["frame_size"]
    half_w, half_h = b[:, 2] / 2, b[:, 3] / 2
    sx, sy = geom["scale"]
    h, w = geom["orig_size"]
    x0, x1 = (b[:, 0] - half_w) / sx, (b[:, 0] + half_w) / sx
    y0, y1 = (b[:, 1] - half_h) / sy, (b[:, 1] + half_h) / sy
    return np.stack([np.clip(x0, 0, w), np.clip(y0, 0, h), np.clip(x1, 0, w),
                     np.clip(y1, 0, h)], axis=-1).astype(np.float32)  # [S, 4]

  # ---------------------------------------------------------------- inference
  def run(self, image: np.ndarray, text_ids: np.ndarray, text_mask: np.ndarray) -> dict:
    """The exported forward on one batch (padded to the exported batch size here)."""
    n = image.shape[0]
    b = self.batch_size or n
    if n > b:
      raise InputError(f"{n} queries in one call; this export runs batches of {b}")
    pad = lambda x: np.concatenate([x, np.repeat(x[-1:], b - n, axis=0)])  # noqa: E731
    out = self.exported.call(self.params, pad(image), pad(text_ids), pad(text_mask))
    return {k: (tuple(np.asarray(t)[:n] for t in v) if isinstance(v, (tuple, list))
                else np.asarray(v)[:n]) for k, v in out.items()}

  def prepare(self, image, text: str) -> dict:
    """One query read and preprocessed; a bad image or text raises InputError."""
    arr = read_image(image)
    text = clean_expression(text)
    frame, geom = self.letterbox(arr)
    ids, mask, truncated = self.encode(text)
    return {"text": text, "image_size": tuple(int(v) for v in arr.shape[:2]),
            "frame": frame, "text_ids": ids, "text_mask": mask, "truncated": truncated,
            "geometry": geom}

  def predict_prepared(self, rows: list[dict]) -> list[dict]:
    """Results of prepared queries, in order, in batches of the exported size."""
    results = []
    step = self.batch_size or max(1, len(rows))
    for start in range(0, len(rows), step):
      chunk = rows[start:start + step]
      out = self.run(np.stack([r["frame"] for r in chunk]),
                     np.stack([r["text_ids"] for r in chunk]),
                     np.stack([r["text_mask"] for r in chunk]))
      for i, row in enumerate(chunk):
        frame_boxes = np.asarray(out["boxes"][i], np.float32)  # [S, 4]
        results.append({
            "text": row["text"], "image_size": row["image_size"],
            "frame_boxes": frame_boxes, "boxes": self.to_pixels(frame_boxes, row["geometry"]),
            "taken": tuple(np.asarray(t[i]) > 0.5 for t in out["taken"]),
            "geometry": row["geometry"], "truncated": row["truncated"],
            "pred_iou": (np.asarray(out["pred_iou"][i], np.float32)
                         if "pred_iou" in out else None)})
    return results

  def predict_batch(self, images, texts) -> list[dict]:
    """One result dict per (image, text) (see `to_json` for its printed form)."""
    return self.predict_prepared([self.prepare(im, t) for im, t in zip(images, texts)])


def to_json(result: dict) -> dict:
  """The fields of a `scanformer predict` output line."""
  boxes = result["boxes"]
  out = {"text": result["text"], "image_size": list(result["image_size"]),
         "box": [round(float(v), 2) for v in boxes[-1]],
         "boxes_per_scale": [[round(float(v), 2) for v in b] for b in boxes],
         "keep_ratio": [float(t.mean()) for t in result["taken"]],
         "truncated": bool(result["truncated"])}
  if result["pred_iou"] is not None:
    out["pred_iou"] = [float(v) for v in result["pred_iou"]]
  return out


def use_compilation_cache() -> None:
  """jax's persistent compilation cache, as `scanformer` uses it (before jax loads):
  $SCANFORMER_CACHE_DIR, else ~/.cache/scanformer_jax/jax; SCANFORMER_NO_CACHE=1: off."""
  if os.environ.get("SCANFORMER_NO_CACHE", "").lower() not in ("", "0", "false", "no"):
    return
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  path = os.environ.get("SCANFORMER_CACHE_DIR") or os.path.join(base, "scanformer_jax", "jax")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return  # run uncached
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def main(argv=None) -> int:
  use_compilation_cache()
  here = os.path.dirname(os.path.abspath(__file__))
  parser = argparse.ArgumentParser(description="Box of the object an expression refers "
                                   "to, from an exported ScanFormer model.")
  parser.add_argument("--image", required=True, help="image file (any Pillow format)")
  parser.add_argument("--text", required=True, help="the referring expression")
  parser.add_argument("--model", default=here,
                      help="the export directory (default: this script's directory)")
  args = parser.parse_args(argv)
  try:
    model = ExportedModel(args.model)
    result = model.predict_batch([args.image], [args.text])[0]
  except (InputError, OSError) as e:
    print(f"run_exported: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"image": args.image, **to_json(result),
                    "checkpoint_step": model.spec.get("checkpoint_step")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
