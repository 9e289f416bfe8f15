"""Letterbox / augmentation geometry, box mapping back to pixels, left-right flip."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data_pipelines import images, transforms as T
from data_pipelines.bad_input import BadSample


def _meta(geom: T.Geometry, h: int, w: int, r: int) -> dict:
  return {"frame_size": r, "scale": np.array([geom.sx, geom.sy]),
          "offset": np.array([geom.ox, geom.oy]), "flip": geom.flip,
          "orig_size": np.array([h, w])}


def test_box_format_roundtrip():
  box = np.array([[1.0, 2.0, 5.0, 10.0], [0.0, 0.0, 3.0, 3.0]])
  np.testing.assert_allclose(T.cxcywh_to_xyxy(T.xyxy_to_cxcywh(box)), box, atol=1e-6)
  np.testing.assert_allclose(T.xyxy_to_cxcywh(box[0]), [3, 6, 4, 8])
  # TFDS BBox (ymin, xmin, ymax, xmax) normalized -> pixels.
  np.testing.assert_allclose(T.yxyx_norm_to_xyxy([0.1, 0.2, 0.5, 1.0], 100, 50),
                             [10, 10, 50, 50])


@pytest.mark.parametrize("w,h", [(640, 480), (300, 500), (64, 64)])
def test_letterbox_top_left_and_box_back_to_pixels(w, h):
  r = 128
  g = T.letterbox_geometry(w, h, r)
  assert max(g.out_w, g.out_h) == r and g.ox == 0 and g.oy == 0
  assert abs(g.out_w / g.out_h - w / h) < 0.02  # aspect kept
  box = np.array([w * 0.1, h * 0.2, w * 0.7, h * 0.9])
  fbox = g.apply(box)
  norm = T.xyxy_to_cxcywh(fbox / r)
  back = T.box_to_original_pixels(norm, _meta(g, h, w, r))
  np.testing.assert_allclose(back, box, rtol=1e-5, atol=1e-3)


def test_letterbox_pixels_and_padding():
  img = np.zeros((30, 60, 3), np.uint8)
  img[:, :30] = (255, 0, 0)  # left half red
  g = T.letterbox_geometry(60, 30, 32)
  pil = Image.fromarray(img)
  pix = np.asarray(T.render(pil, g))
  assert pix.shape == (16, 32, 3)
  frame = T.to_frame(pix, 32)
  assert frame.shape == (32, 32, 3) and frame.dtype == np.float32
  np.testing.assert_array_equal(frame[16:], 0.0)  # padding = 0 after normalization
  np.testing.assert_allclose(frame[5, 3], [1, -1, -1], atol=1e-6)  # red, normalized
  np.testing.assert_allclose(T.denormalize(frame[5, 3]), [255, 0, 0])


def test_swap_left_right_words():
  assert T.swap_left_right("the man on the left") == "the man on the right"
  assert T.swap_left_right("Left cup, right of the leftmost dog") == \
      "Right cup, left of the rightmost dog"
  assert T.swap_left_right("RIGHT") == "LEFT"
  assert T.swap_left_right("bright lefty cleft") == "bright lefty cleft"


def test_flip_mirrors_box_and_swaps_words_in_pipeline_geometry():
  w, h, r = 200, 100, 64
  box = np.array([10.0, 20.0, 50.0, 60.0])
  g = T.letterbox_geometry(w, h, r, flip=True)
  fbox = g.apply(box)
  s = g.out_w / w
  np.testing.assert_allclose(fbox, [g.out_w - 50 * s, 20 * s, g.out_w - 10 * s, 60 * s])
  back = T.box_to_original_pixels(T.xyxy_to_cxcywh(fbox / r), _meta(g, h, w, r))
  np.testing.assert_allclose(back, box, atol=1e-3)
  # Pixels: a red block on the left ends up on the right.
  img = np.zeros((h, w, 3), np.uint8)
  img[20:60, 10:50] = (255, 0, 0)
  pix = np.asarray(T.render(Image.fromarray(img), g))
  x0, y0, x1, y1 = np.round(fbox).astype(int)
  assert pix[y0 + 2:y1 - 2, x0 + 2:x1 - 2, 0].min() > 200
  assert pix[:, : x0 - 2, 0].max() < 30


def test_random_augmentation_keeps_box_inside_and_maps_back():
  rng = np.random.default_rng(0)
  cfg = T.AugmentConfig(crop_prob=0.8, zoom_prob=0.5)
  r = 64
  for _ in range(300):
    w, h = (int(v) for v in rng.integers(20, 400, size=2))
    bw, bh = rng.uniform(1, w), rng.uniform(1, h)
    x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    box = np.array([x0, y0, x0 + bw, y0 + bh])
    g = T.random_geometry(rng, w, h, box, r, cfg)
    cx0, cy0, cx1, cy1 = g.crop
    assert cx0 <= x0 + 1e-6 and cy0 <= y0 + 1e-6 and cx1 >= box[2] - 1e-6 and cy1 >= box[3] - 1e-6
    fbox = g.apply(box)
    assert fbox[0] >= -1e-6 and fbox[1] >= -1e-6
    assert fbox[2] <= g.out_w + 1e-6 and fbox[3] <= g.out_h + 1e-6 <= r + 1e-6
    assert fbox[2] > fbox[0] and fbox[3] > fbox[1]
    back = T.box_to_original_pixels(T.xyxy_to_cxcywh(fbox / r), _meta(g, h, w, r))
    np.testing.assert_allclose(back, box, atol=1e-2 * max(w, h) / r + 1e-3)


def test_augmented_pixels_follow_the_box():
  """The target block is where the augmented box says, for many random draws."""
  rng = np.random.default_rng(1)
  img = np.full((90, 160, 3), 60, np.uint8)
  box = np.array([100.0, 30.0, 140.0, 70.0])
  img[30:70, 100:140] = (250, 250, 250)
  data = io.BytesIO()
  Image.fromarray(img).save(data, format="PNG")
  for _ in range(20):
    g = T.random_geometry(rng, 160, 90, box, 64, T.AugmentConfig(crop_prob=1.0))
    pix = np.asarray(T.render(images.open_image(data.getvalue()), g))
    x0, y0, x1, y1 = g.apply(box)
    inner = pix[int(np.ceil(y0)) + 1:int(y1) - 1, int(np.ceil(x0)) + 1:int(x1) - 1]
    assert inner.size and inner.min() > 200


def test_color_jitter_matches_its_definition_and_is_seeded():
  arr = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
  img = Image.fromarray(arr)
  a = np.asarray(T.color_jitter(img, np.random.default_rng(5), 0.2)).astype(float)
  b = np.asarray(T.color_jitter(img, np.random.default_rng(5), 0.2)).astype(float)
  np.testing.assert_array_equal(a, b)
  # Reference: brightness, then contrast around the mean, then saturation around luma.
  bri, con, sat = np.random.default_rng(5).uniform(0.8, 1.2, size=3)
  x = arr.astype(float) * bri
  x = (x - x.mean()) * con + x.mean()
  gray = (x @ np.array([0.299, 0.587, 0.114]))[..., None]
  ref = np.clip(gray + (x - gray) * sat, 0, 255)
  assert np.abs(a - ref).max() <= 1.0
  assert np.abs(a - arr).mean() < 60


def test_undecodable_image_is_a_bad_sample():
  with pytest.raises(BadSample) as e:
    images.open_image(b"not an image")
  assert e.value.reason == "image"
  good = io.BytesIO()
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(good, format="JPEG")
  truncated = good.getvalue()[: len(good.getvalue()) // 2]
  with pytest.raises(BadSample) as e:
    T.render(images.open_image(truncated), T.letterbox_geometry(40, 40, 16))
  assert e.value.reason == "image"
