"""The scan picture (what each scale read, where it put its box) and the gallery."""

import dataclasses
import html.parser
import os

import numpy as np
import pytest

from data_pipelines import processing, synthetic, transforms
from data_pipelines.tokenizer import Tokenizer
from scanformer_jax.visualize import gallery
from scanformer_jax.visualize import scan_picture as sp
from visualize_fixtures import letterbox_meta, make_records, noise


def frame_boxes(boxes_px: np.ndarray, meta: dict) -> np.ndarray:
  """Original-pixel (x0, y0, x1, y1) [S, 4] -> normalized frame (cx, cy, w, h)."""
  sx, sy = meta["scale"]
  scaled = np.asarray(boxes_px, np.float64) * np.array([sx, sy, sx, sy])
  return transforms.xyxy_to_cxcywh(scaled / meta["frame_size"])


def all_taken(grids) -> list[np.ndarray]:
  return [np.ones(g * g, bool) for g in grids]


def block_mean(img: np.ndarray, factor: int) -> np.ndarray:
  """Independent reference: the factor x factor mean, upsampled back, rounded."""
  h, w = img.shape[:2]
  small = img.astype(np.float64).reshape(h // factor, factor, w // factor, factor, 3)
  small = np.floor(small.mean(axis=(1, 3)) + 0.5).astype(np.uint8)
  return np.repeat(np.repeat(small, factor, 0), factor, 1)


# ------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("height, width, panel", [
    (300, 400, (300, 400)),     # inside [MIN_SIDE, MAX_SIDE]: drawn at its own size
    (40, 50, (205, 256)),       # tiny: upscaled to MIN_SIDE
    (2000, 1500, (1024, 768)),  # large: downscaled to MAX_SIDE
])
def test_picture_shape(height, width, panel):
  grids = (2, 4, 8)
  meta = letterbox_meta(height, width, 128)
  boxes = np.tile([[0.3, 0.3, 0.2, 0.2]], (3, 1))
  pic = sp.scan_picture(noise(height, width), meta, boxes, all_taken(grids), "a dog")
  ph, pw = panel
  assert pic.dtype == np.uint8 and pic.ndim == 3 and pic.shape[2] == 3
  assert pic.shape[1] == 2 * pw + max(8, pw // 40)  # two panels and the gap
  assert pic.shape[0] > ph + 2 * sp.MIN_FONT_SIZE  # a caption band below


def test_picture_rejects_a_meta_of_another_image():
  meta = letterbox_meta(100, 120, 64)
  with pytest.raises(ValueError, match="orig_size"):
    sp.scan_picture(noise(90, 120), meta, np.zeros((2, 4)), all_taken((2, 4)), "x")


def test_taken_mask_must_be_a_square_grid():
  with pytest.raises(ValueError, match="square"):
    sp.rebuild_from_patches(noise(64, 64), [np.ones(4, bool), np.ones(12, bool)])


# ---------------------------------------------------------------- patch rebuild
def test_read_patch_shows_at_its_finest_level():
  # Frame 64 px, patch 16: scale 0 is 16 px (grid 1), scale 1 32 px (2), scale 2 64 px (4).
  frame = noise(64, 64)
  taken = [np.ones(1, bool), np.zeros(4, bool), np.zeros(16, bool)]
  taken[1][0 * 2 + 1] = True   # scale 1 reads the top-right quarter, frame [0:32, 32:64]
  taken[2][1 * 4 + 2] = True   # scale 2 reads one patch inside it, frame [16:32, 32:48]
  out = sp.rebuild_from_patches(frame, taken)
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[16:32, 32:48], frame[16:32, 32:48])  # full res
  half, quarter = block_mean(frame, 2), block_mean(frame, 4)
  np.testing.assert_array_equal(out[0:16, 32:64], half[0:16, 32:64])  # scale 1's view
  np.testing.assert_array_equal(out[16:32, 48:64], half[16:32, 48:64])
  np.testing.assert_array_equal(out[32:64, :], quarter[32:64, :])  # only scale 0 read it
  np.testing.assert_array_equal(out[0:32, 0:32], quarter[0:32, 0:32])
  assert not np.array_equal(out[32:64, :], frame[32:64, :])  # coarse is really coarser


def test_picture_right_panel_is_the_rebuild_in_the_original_aspect():
  # 256 x 128 image, frame 256 (scale 1: no resampling), patch 16, grids 4 / 8 / 16.
  image = noise(128, 256, seed=1)
  meta = letterbox_meta(128, 256, 256)
  taken = [np.ones(16, bool), np.zeros(64, bool), np.zeros(256, bool)]
  taken[1][0 * 8 + 5] = True   # frame [0:32, 160:192]
  taken[2][3 * 16 + 2] = True  # frame [48:64, 32:48]
  pic = sp.scan_picture(image, meta, np.tile([[0.5, 0.25, 0.2, 0.2]], (3, 1)), taken,
                        "stripes", grid=False)
  right = pic[:128, pic.shape[1] - 256:]  # [128, 256, 3]: the letterbox padding cropped
  np.testing.assert_array_equal(right[48:64, 32:48], image[48:64, 32:48])
  np.testing.assert_array_equal(right[0:32, 160:192], block_mean(image, 2)[0:32, 160:192])
  np.testing.assert_array_equal(right[64:128], block_mean(image, 4)[64:128])


def test_frame_is_what_the_model_was_given():
  # The rebuild starts from `to_frame(original, meta)`: it must match the predict
  # pipeline's own letterboxed input (up to rounding), padding included.
  image = noise(90, 150, seed=4)
  batch, meta = processing.preprocess_single(image, "a cat", Tokenizer(synthetic.vocab(), 8),
                                           64, 8)
  row = {k: v[0] for k, v in meta.items()}
  frame = sp.to_frame(image, row).astype(int)  # [64, 64, 3]
  model_input = transforms.denormalize(batch["image"][0]).astype(int)
  assert np.abs(frame - model_input).max() <= 1


def test_flipped_frame_maps_back_unflipped():
  # A training row (mirrored): the rebuild must come back in the original's orientation.
  image = noise(128, 256, seed=3)
  g = transforms.letterbox_geometry(256, 128, 256, flip=True)
  meta = {"orig_size": np.array([128, 256]), "frame_size": 256, "scale": np.array([g.sx, g.sy]),
          "offset": np.array([g.ox, g.oy]), "flip": True}
  frame = sp.to_frame(image, meta)
  np.testing.assert_array_equal(frame[:128], image[:, ::-1])
  panel = sp.from_frame(frame, meta, (256, 128))
  np.testing.assert_array_equal(panel, image)


def test_patch_outlines_leave_patch_interiors_untouched():
  image = noise(128, 256, seed=2)
  meta = letterbox_meta(128, 256, 256)
  taken = [np.ones(16, bool), np.zeros(64, bool), np.zeros(256, bool)]
  taken[1][0 * 8 + 5] = True
  taken[2][3 * 16 + 2] = True
  pic = sp.scan_picture(image, meta, np.tile([[0.9, 0.9, 0.01, 0.01]], (3, 1)), taken, "x")
  right = pic[:128, pic.shape[1] - 256:]
  np.testing.assert_array_equal(right[49:63, 33:47], image[49:63, 33:47])
  assert not np.array_equal(right[48, 32:48], image[48, 32:48])  # the outline itself


# --------------------------------------------------------------------- boxes drawn
def test_boxes_drawn_where_the_model_put_them():
  # 256 x 200 image into a 128 frame: scale 0.5 exactly, so boxes map to whole pixels.
  grey = np.full((200, 256, 3), 128, np.uint8)
  meta = letterbox_meta(200, 256, 128)
  boxes_px = np.array([[10, 20, 90, 100], [120, 30, 180, 90], [150, 120, 240, 190]])
  gt = np.array([20.0, 130.0, 100.0, 180.0])
  pic = sp.scan_picture(grey, meta, frame_boxes(boxes_px, meta), all_taken((2, 4, 8)),
                        "a box", gt_box=gt)
  line = 2  # max(2, round(256 / 250))
  for s, (x0, y0, x1, y1) in enumerate(boxes_px):
    colour = sp.SCALE_COLOURS[s]
    xm, ym = (x0 + x1) // 2, (y0 + y1) // 2
    for y, x in [(y0, xm), (y0 + line - 1, xm), (y1, xm), (ym, x0), (ym, x1)]:
      np.testing.assert_array_equal(pic[y, x], colour, err_msg=f"scale {s} at {(y, x)}")
    np.testing.assert_array_equal(pic[y0 - 1, xm], [128, 128, 128])  # just outside
    np.testing.assert_array_equal(pic[ym, xm], [128, 128, 128])  # inside: untouched
    thick = 2 * line if s == len(boxes_px) - 1 else line  # the answer is emphasised
    inner = pic[y0 + thick, xm]
    np.testing.assert_array_equal(inner, [128, 128, 128])
    if s == len(boxes_px) - 1:
      np.testing.assert_array_equal(pic[y0 + thick - 1, xm], colour)
  gx0, gy0, gx1, gy1 = gt.astype(int)
  assert tuple(pic[gy0 + 2, (gx0 + gx1) // 2]) == sp.GT_COLOUR  # white inside a dark rim
  assert tuple(pic[gy0, (gx0 + gx1) // 2]) == (0, 0, 0)


# ---------------------------------------------------------------------- legibility
def test_caption_font_grows_with_the_image_and_has_a_minimum():
  assert sp.caption_font_size(8) == sp.MIN_FONT_SIZE
  assert sp.caption_font_size(sp.MIN_SIDE) >= sp.MIN_FONT_SIZE
  sizes = [sp.caption_font_size(w) for w in (256, 512, 1024)]
  assert sizes[0] < sizes[1] < sizes[2]

  def band(height, width):
    meta = letterbox_meta(height, width, 64)
    pic = sp.scan_picture(noise(height, width), meta, np.zeros((2, 4)), all_taken((2, 4)),
                          "cat")
    return pic.shape[0] - round(height * sp.display_factor(height, width))

  assert band(300, 1000) > band(300, 400) >= 2 * sp.MIN_FONT_SIZE


def test_long_expression_wraps_inside_the_panel():
  meta = letterbox_meta(256, 256, 64)
  short = sp.scan_picture(noise(256, 256), meta, np.zeros((2, 4)), all_taken((2, 4)), "cat")
  text = "the " + "very " * 40 + "long " + "x" * 200
  long = sp.scan_picture(noise(256, 256), meta, np.zeros((2, 4)), all_taken((2, 4)), text)
  assert long.shape[1] == short.shape[1]  # never wider: wrapped, not cut off the side
  assert long.shape[0] > short.shape[0] + 5 * sp.MIN_FONT_SIZE


# ------------------------------------------------------------------------- gallery
class _Images(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.srcs = []
    self.tags = []

  def handle_starttag(self, tag, attrs):
    self.tags.append(tag)
    if tag == "img":
      self.srcs.append(dict(attrs)["src"])


def test_choose_samples_is_deterministic_and_picks_the_extremes():
  iou = np.array([0.9, 0.1, 0.6, 0.05, 0.95, 0.3, 0.7, 0.2, 0.8, 0.4])
  first = gallery.choose_samples(iou, size=6, seed=3)
  again = gallery.choose_samples(iou, size=6, seed=3)
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  np.testing.assert_array_equal(first["worst"], [3, 1])
  np.testing.assert_array_equal(first["best"], [4, 0])
  chosen = np.concatenate(list(first.values()))
  assert len(chosen) == 6 and len(np.unique(chosen)) == 6
  assert all(gallery.choose_samples(iou, size=40)[k].size for k in first)
  assert sum(v.size for v in gallery.choose_samples(iou, size=40).values()) == len(iou)


def test_gallery_page_links_existing_images_and_escapes_text(tmp_path):
  records, images = make_records(9)
  summary = {"acc@0.5": 0.5, "acc@0.5_per_scale": [0.25, 0.5], "mean_iou": 0.41,
             "keep_ratio": [1.0, 0.4], "count": 9, "split": "val<script>",
             "early_exit": {"criterion": "pred_iou>0.7", "gflops": 1.5}}
  loaded = []

  def load_image(record):
    loaded.append(record.sample_id)
    return images[record.sample_id]

  path = gallery.write_gallery(tmp_path / "g", records, summary, load_image, size=6)
  assert path == os.path.join(tmp_path / "g", "index.html")
  page = open(path, encoding="utf-8").read()
  parser = _Images()
  parser.feed(page)
  assert len(parser.srcs) == 6 and len(loaded) == 6  # only shown samples are loaded
  for src in parser.srcs:
    assert not os.path.isabs(src) and "://" not in src
    assert os.path.isfile(os.path.join(tmp_path / "g", src)), src
  assert "script" not in parser.tags and "b" not in parser.tags  # no markup got through
  assert "&lt;b&gt;cup&lt;/b&gt; &amp; &quot;saucer&quot;" in page
  assert "val&lt;script&gt;" in page and "early_exit.gflops" in page
  for heading in ("Worst misses", "Best hits", "Random sample"):
    assert heading in page


def test_gallery_of_no_hits_says_so(tmp_path):
  records, images = make_records(4)
  records = [dataclasses.replace(r, iou=np.array([0.0, 0.1])) for r in records]
  path = gallery.write_gallery(tmp_path, records, {"count": 4}, lambda r: images[r.sample_id],
                               size=3)
  page = open(path, encoding="utf-8").read()
  assert "Best hits (0)</h2>\n<p>none</p>" in page
  assert page.count("<img ") == 3
