"""The scan picture: where each scale put its box and which patches it read.

One builder (`scan_picture`) serves predict and eval. Side by side:

  left   the input with every scale's box (red, green, blue from coarse to fine, as
         in the article's figures; the answer, the last scale, drawn thicker), each
         between a dark outer and a light inner keyline so it stays visible on any
         object colour (a green box on a green object); the ground truth when known;
         the expression as a caption below, the words past `max_text_len` (which the
         model never read) listed after "not read:" in grey.
  right  the image rebuilt from only the patches the model read: every region shows
         at the finest scale that read it (scale 0 reads everything, so what no finer
         scale took stays coarse); the keep ratio of each scale written below.

The rebuild happens in the model's letterboxed frame (the image at the top-left of an
R x R square, `data_pipelines/contract.py`), then maps back to the original aspect.
Text uses a scalable TrueType font sized from the panel width with a minimum, so the
captions stay legible from thumbnails to photos.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipelines.transforms import box_to_original_pixels

# Box colours per scale, coarse to fine: red, green, blue as in the article's figures; more
# scales than three continue with orange and magenta.
SCALE_COLOURS = ((230, 40, 40), (30, 170, 60), (40, 90, 240), (245, 150, 30), (200, 40, 200))
GT_COLOUR = (255, 255, 255)
OUTLINE_DARK = (0, 0, 0)
OUTLINE_LIGHT = (255, 255, 255)
CUT_COLOUR = (150, 150, 150)  # Words of a truncated expression that were not read.
PAD_GREY = 128  # Letterbox padding (normalized 0.0) in uint8 terms.
# Panels are drawn with the original's long side in [MIN_SIDE, MAX_SIDE] px.
MIN_SIDE = 256
MAX_SIDE = 1024
MIN_FONT_SIZE = 14
GRID_ALPHA = 0.5  # Opacity of the outlines of the patches finer scales read.


def scale_colour(scale: int) -> tuple[int, int, int]:
  return SCALE_COLOURS[scale % len(SCALE_COLOURS)]


def caption_font_size(panel_width: int) -> int:
  """Font px for a panel `panel_width` px wide: proportional, never below the minimum."""
  return max(MIN_FONT_SIZE, round(panel_width / 32))


def display_factor(height: int, width: int) -> float:
  """Original px -> panel px: 1 unless the long side is outside [MIN_SIDE, MAX_SIDE]."""
  side = max(height, width)
  if side > MAX_SIDE:
    return MAX_SIDE / side
  if side < MIN_SIDE:
    return MIN_SIDE / side
  return 1.0


# --------------------------------------------------------------------- frame geometry
def _frame_rect(meta: Mapping[str, Any]) -> tuple[float, float, float, float]:
  """Where the whole original image lands in the frame: (x0, y0, x1, y1) frame px."""
  h, w = (float(v) for v in np.asarray(meta["orig_size"]))
  sx, sy = (float(v) for v in np.asarray(meta["scale"]))
  ox, oy = (float(v) for v in np.asarray(meta["offset"]))
  sign = -1.0 if bool(meta["flip"]) else 1.0
  xa, xb = sorted([ox, sign * sx * w + ox])
  return xa, oy, xb, sy * h + oy


def to_frame(image: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
  """Original uint8 [H, W, 3] -> the model's letterboxed frame, uint8 [R, R, 3]."""
  r = int(meta["frame_size"])
  x0, y0, x1, y1 = _frame_rect(meta)
  img = Image.fromarray(image).resize((max(1, round(x1 - x0)), max(1, round(y1 - y0))),
                                      Image.BILINEAR)
  if bool(meta["flip"]):
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  frame = Image.new("RGB", (r, r), (PAD_GREY,) * 3)
  frame.paste(img, (round(x0), round(y0)))
  return np.asarray(frame)


def from_frame(frame: np.ndarray, meta: Mapping[str, Any],
               panel_size: tuple[int, int]) -> np.ndarray:
  """Frame uint8 [R, R, 3] -> the original's view, uint8 [ph, pw, 3] (`to_frame` undone).

  Parts of the original outside the frame (a training crop) stay grey.
  """
  pw, ph = panel_size
  r = frame.shape[0]
  x0, y0, x1, y1 = _frame_rect(meta)
  vx0, vy0 = max(0, round(x0)), max(0, round(y0))
  vx1, vy1 = min(r, round(x1)), min(r, round(y1))
  panel = Image.new("RGB", (pw, ph), (PAD_GREY,) * 3)
  if vx1 <= vx0 or vy1 <= vy0:
    return np.asarray(panel)
  part = Image.fromarray(frame[vy0:vy1, vx0:vx1])
  flip = bool(meta["flip"])
  if flip:
    part = part.transpose(Image.FLIP_LEFT_RIGHT)
  # The visible window in panel px (the frame maps linearly onto the original).
  fx, fy = pw / (x1 - x0), ph / (y1 - y0)
  px0 = (x1 - vx1) * fx if flip else (vx0 - x0) * fx
  px1 = (x1 - vx0) * fx if flip else (vx1 - x0) * fx
  py0, py1 = (vy0 - y0) * fy, (vy1 - y0) * fy
  size = (max(1, round(px1 - px0)), max(1, round(py1 - py0)))
  panel.paste(part.resize(size, Image.BILINEAR), (round(px0), round(py0)))
  return np.asarray(panel)


# ---------------------------------------------------------------------------- rebuild
def grid_sides(taken: Sequence[np.ndarray], frame_size: int) -> tuple[int, ...]:
  """Patch grid side G_s of every scale from its flat taken mask [G_s * G_s]."""
  sides = []
  for s, mask in enumerate(taken):
    n = int(np.asarray(mask).size)
    g = math.isqrt(n)
    if g * g != n:
      raise ValueError(f"taken mask of scale {s} has {n} entries, not a square grid")
    if frame_size % g:
      raise ValueError(f"frame {frame_size} px does not split into {g} x {g} patches")
    sides.append(g)
  finest = sides[-1]
  for s, g in enumerate(sides):
    if finest % g:
      raise ValueError(f"scale {s} grid {g} does not divide the finest grid {finest}")
  return tuple(sides)


def _area_downsample(frame: np.ndarray, factor: int) -> np.ndarray:
  """Mean over factor x factor blocks: uint8 [R, R, 3] -> float [R/f, R/f, 3]."""
  r = frame.shape[0]
  blocks = frame.astype(np.float32).reshape(r // factor, factor, r // factor, factor, 3)
  return blocks.mean(axis=(1, 3))


def scale_view(frame: np.ndarray, grid: int, patch_size: int) -> np.ndarray:
  """The frame as one scale sees it (grid * patch px), upsampled back: uint8 [R, R, 3]."""
  r = frame.shape[0]
  factor = r // (grid * patch_size)
  if factor == 1:
    return frame.copy()
  small = np.floor(_area_downsample(frame, factor) + 0.5).astype(np.uint8)
  return np.repeat(np.repeat(small, factor, axis=0), factor, axis=1)


def _cell_mask(mask: np.ndarray, grid: int, frame_size: int) -> np.ndarray:
  """Flat row-major [G * G] taken mask -> pixel mask [R, R] bool."""
  cells = np.asarray(mask).reshape(grid, grid) > 0.5  # float 0/1 in dense mode
  cell = frame_size // grid
  return np.repeat(np.repeat(cells, cell, axis=0), cell, axis=1)


def rebuild_from_patches(frame: np.ndarray, taken: Sequence[np.ndarray]) -> np.ndarray:
  """The frame rebuilt from the patches each scale read: uint8 [R, R, 3].

  Scales paint coarse to fine, each over the cells it took at its own resolution, so
  every region ends at the finest scale that read it. Never-read cells stay grey.
  """
  r = frame.shape[0]
  if frame.shape != (r, r, 3) or frame.dtype != np.uint8:
    raise ValueError(f"expected a uint8 [R, R, 3] frame, got {frame.dtype} {frame.shape}")
  sides = grid_sides(taken, r)
  patch_size = r // sides[-1]
  out = np.full_like(frame, PAD_GREY)  # [R, R, 3]
  for mask, grid in zip(taken, sides):
    pixels = _cell_mask(mask, grid, r)  # [R, R]
    out[pixels] = scale_view(frame, grid, patch_size)[pixels]
  return out


def _draw_patch_outlines(panel: np.ndarray, taken: Sequence[np.ndarray],
                         meta: Mapping[str, Any]) -> np.ndarray:
  """Thin (1 px at any size) outlines of the cells each scale >= 1 read, on the panel."""
  r = int(meta["frame_size"])
  sides = grid_sides(taken, r)
  ph, pw = panel.shape[:2]
  x0, y0, x1, y1 = _frame_rect(meta)
  fx, fy = pw / (x1 - x0), ph / (y1 - y0)
  flip = bool(meta["flip"])
  to_x = (lambda x: (x1 - x) * fx) if flip else (lambda x: (x - x0) * fx)  # frame -> panel
  layer = Image.new("RGBA", (pw, ph), (0, 0, 0, 0))
  draw = ImageDraw.Draw(layer)
  alpha = round(255 * GRID_ALPHA)
  for s in range(1, len(taken)):
    grid, cell = sides[s], r // sides[s]
    rows, cols = np.nonzero(np.asarray(taken[s]).reshape(grid, grid) > 0.5)
    for row, col in zip(rows, cols):
      ax, bx = sorted([to_x(col * cell), to_x((col + 1) * cell)])
      ay, by = (row * cell - y0) * fy, ((row + 1) * cell - y0) * fy
      draw.rectangle([round(ax), round(ay), round(bx) - 1, round(by) - 1],
                     outline=scale_colour(s) + (alpha,), width=1)
  base = Image.fromarray(panel).convert("RGBA")
  return np.asarray(Image.alpha_composite(base, layer).convert("RGB"))


def keep_ratios(taken: Sequence[np.ndarray]) -> list[float]:
  """Fraction of each scale's patches read."""
  return [float(np.mean(np.asarray(m) > 0.5)) for m in taken]


# ------------------------------------------------------------------------------ text
def _font(size: int) -> ImageFont.FreeTypeFont:
  return ImageFont.load_default(size=size)  # Pillow >= 10.1: scalable TrueType.


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
  """Greedy word wrap to `width` px; a word longer than a line is cut by characters."""
  lines, line = [], ""
  for word in text.split():
    while font.getlength(word) > width and len(word) > 1:
      cut = 1
      while cut < len(word) and font.getlength(word[:cut + 1]) <= width:
        cut += 1
      if line:
        lines.append(line)
        line = ""
      lines.append(word[:cut])
      word = word[cut:]
    candidate = f"{line} {word}" if line else word
    if font.getlength(candidate) <= width:
      line = candidate
    else:
      lines.append(line)
      line = word
  if line:
    lines.append(line)
  return lines or [""]


Segments = list[tuple[str, tuple[int, int, int]]]  # One caption line: (text, colour) runs.


def _caption_lines(font: ImageFont.FreeTypeFont, width: float, legend: Segments,
                   text: str, colour=(20, 20, 20)) -> list[Segments]:
  return [legend] + [[(line, colour)] for line in _wrap(text, font, width)]


def _draw_caption(draw: ImageDraw.ImageDraw, lines: list[Segments], x: float, y: float,
                  font: ImageFont.FreeTypeFont, line_height: int) -> None:
  for k, segments in enumerate(lines):
    cx = x
    for text, colour in segments:
      draw.text((cx, y + k * line_height), text, fill=colour, font=font)
      cx += font.getlength(text)


def draw_box(draw: ImageDraw.ImageDraw, box: Sequence[float], colour: tuple[int, int, int],
             width: int) -> None:
  """A `colour` box of `width` px, with 1 px keylines one pixel off it: dark outside,
  light inside. On an object of the box's own colour the keylines still show; the
  pixels right next to the box stay the image's, so its edges read exactly."""
  x0, y0, x1, y1 = (float(v) for v in box)
  draw.rectangle([x0 - 2, y0 - 2, x1 + 2, y1 + 2], outline=OUTLINE_DARK, width=1)
  draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
  inset = width + 1
  if x1 - x0 > 2 * inset + 2 and y1 - y0 > 2 * inset + 2:
    draw.rectangle([x0 + inset, y0 + inset, x1 - inset, y1 - inset], outline=OUTLINE_LIGHT,
                   width=1)


def split_read_words(expression: str, words_read: Optional[int]) -> tuple[str, str]:
  """(the words the model read, the words cut off) of `expression`."""
  words = expression.split()
  if words_read is None or words_read >= len(words):
    return expression, ""
  return " ".join(words[:words_read]), " ".join(words[words_read:])


# --------------------------------------------------------------------------- picture
def scan_picture(image: np.ndarray, meta: Mapping[str, Any], boxes: np.ndarray,
                 taken: Sequence[np.ndarray], expression: str,
                 gt_box: Optional[np.ndarray] = None,
                 pred_iou: Optional[Sequence[float]] = None,
                 iou: Optional[float] = None, grid: bool = True,
                 words_read: Optional[int] = None) -> np.ndarray:
  """Builds the scan picture of one sample: uint8 [H', W', 3] (module docstring).

  Args:
    image: the original uint8 [H, W, 3] image.
    meta: this sample's letterbox meta (one row of the batch `meta`:
      `orig_size`, `frame_size`, `scale`, `offset`, `flip`).
    boxes: [S, 4] each scale's box, normalized (cx, cy, w, h) in the frame.
    taken: per scale [G_s * G_s] bool (row-major), the patches that scale read.
    expression: the referring expression (caption).
    gt_box: optional [4] ground truth (x0, y0, x1, y1) in original px.
    pred_iou: optional [S] the IoU head's predictions.
    iou: optional IoU of the answer with the ground truth.
    grid: outline the patches the finer scales read on the right panel.
    words_read: of a truncated expression, how many leading words the model read;
      the rest are listed after "not read:" in grey.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
  boxes = np.asarray(boxes, np.float32)
  if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.shape[0] != len(taken):
    raise ValueError(f"expected boxes [S={len(taken)}, 4], got {boxes.shape}")
  h, w = image.shape[:2]
  if tuple(int(v) for v in np.asarray(meta["orig_size"])) != (h, w):
    raise ValueError(f"meta orig_size {np.asarray(meta['orig_size']).tolist()} is not the "
                     f"image's (height, width) {[h, w]}: pass the sample's own meta")
  d = display_factor(h, w)
  pw, ph = max(1, round(w * d)), max(1, round(h * d))
  num_scales = len(taken)

  # Left: the input with the boxes.
  left = Image.fromarray(image).resize((pw, ph), Image.BILINEAR)
  draw = ImageDraw.Draw(left)
  line = max(2, round(max(pw, ph) / 250))
  if gt_box is not None:
    gx0, gy0, gx1, gy1 = (float(v) * d for v in np.asarray(gt_box))
    draw.rectangle([gx0, gy0, gx1, gy1], outline=(0, 0, 0), width=line + 2)
    draw.rectangle([gx0 + 1, gy0 + 1, gx1 - 1, gy1 - 1], outline=GT_COLOUR, width=line)
  pixel_boxes = box_to_original_pixels(boxes, meta) * d  # [S, 4] panel px
  for s, box in enumerate(pixel_boxes):
    draw_box(draw, box, scale_colour(s), 2 * line if s == num_scales - 1 else line)

  # Right: the rebuild.
  frame = rebuild_from_patches(to_frame(image, meta), taken)
  rebuilt = from_frame(frame, meta, (pw, ph))  # [ph, pw, 3]
  if grid:
    rebuilt = _draw_patch_outlines(rebuilt, taken, meta)
  right = Image.fromarray(rebuilt)

  # Captions.
  font = _font(caption_font_size(pw))
  line_height = round(font.size * 1.3)
  pad = max(4, font.size // 2)
  text_width = pw - 2 * pad
  legend: Segments = []
  for s in range(num_scales):
    legend.append((f"s{s}{' answer' if s == num_scales - 1 else ''}", scale_colour(s)))
    legend.append(("  ", (0, 0, 0)))
  if gt_box is not None:
    legend.append(("gt", (90, 90, 90)))
  scores = []
  if iou is not None:
    scores.append(f"IoU {iou:.2f}")
  if pred_iou is not None:
    scores.append(f"predicted IoU {float(np.asarray(pred_iou)[-1]):.2f}")
  read, cut = split_read_words(expression, words_read)
  left_lines = _caption_lines(font, text_width, legend, f'"{read}"' + (" ..." if cut else ""))
  if cut:
    left_lines += [[(f"not read: {t}" if k == 0 else t, CUT_COLOUR)]
                   for k, t in enumerate(_wrap(cut, font, text_width))]
  if scores:
    left_lines.append([("   ".join(scores), (60, 60, 60))])
  ratios = "  ".join(f"s{s} {100 * k:.0f}%" for s, k in enumerate(keep_ratios(taken)))
  right_lines = _caption_lines(font, text_width, [(ratios, (20, 20, 20))],
                               "patches read: each region at the finest scale that read it",
                               colour=(90, 90, 90))
  band = 2 * pad + line_height * max(len(left_lines), len(right_lines))

  gap = max(8, pw // 40)
  canvas = Image.new("RGB", (2 * pw + gap, ph + band), (255, 255, 255))
  canvas.paste(left, (0, 0))
  canvas.paste(right, (pw + gap, 0))
  draw = ImageDraw.Draw(canvas)
  _draw_caption(draw, left_lines, pad, ph + pad, font, line_height)
  _draw_caption(draw, right_lines, pw + gap + pad, ph + pad, font, line_height)
  return np.asarray(canvas)
