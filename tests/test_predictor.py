"""The Python inference API: `scanformer_jax.load(workdir)`, one query and batched."""

import logging

import numpy as np
import pytest
from PIL import Image

import scanformer_jax
import train_helpers
from tiny_run import tiny_run
from visualize_fixtures import noise


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
  return scanformer_jax.load(tiny_run(tmp_path_factory), batch_size=2)


def _queries(tmp_path):
  """Three queries, one per input kind: a path, a PIL image, a uint8 array."""
  path = tmp_path / "a.png"
  Image.fromarray(noise(70, 100, seed=1)).save(path)
  return ([str(path), Image.fromarray(noise(64, 64, seed=2)), noise(90, 50, seed=3)],
          ["the small red square", "the blue circle", "the object left of the square"])


def test_single_and_batched_predictions_agree(predictor, tmp_path):
  images, texts = _queries(tmp_path)
  batched = predictor.predict_batch(images, texts)  # batches of 2: the last one padded
  assert len(batched) == 3
  for image, text, b in zip(images, texts, batched):
    one = predictor(image, text)
    assert one.text == b.text == text
    assert one.image_size == b.image_size
    np.testing.assert_allclose(one.boxes, b.boxes, atol=1e-2)  # px
    for t_one, t_b in zip(one.taken, b.taken):
      np.testing.assert_array_equal(t_one, t_b)
    np.testing.assert_allclose(one.pred_iou, b.pred_iou, atol=1e-4)
    assert one.keep_ratio == b.keep_ratio
    h, w = one.image_size
    x0, y0, x1, y1 = one.box
    assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
    out = one.to_json()
    assert set(out) == {"text", "image_size", "box", "boxes_per_scale", "keep_ratio",
                        "truncated", "pred_iou"}
    assert out["box"] == out["boxes_per_scale"][-1] and out["truncated"] is False
    assert len(out["keep_ratio"]) == 2 and out["keep_ratio"][0] == 1.0
  assert [b.image_size for b in batched] == [(70, 100), (64, 64), (90, 50)]


def test_compiled_once_per_batch_size(predictor, tmp_path):
  images, texts = _queries(tmp_path)
  predictor.predict_batch(images[:2], texts[:2])  # batch size 2 compiled (or already)
  before = predictor.trace_count
  predictor.predict_batch(images[:2] * 2, texts[:2] * 2)  # two more batches of 2
  predictor.predict_batch(images, texts)
  assert predictor.trace_count == before
  predictor.predict_batch(images, texts, batch_size=3)  # a new size compiles once
  predictor.predict_batch(images[::-1], texts, batch_size=3)
  assert predictor.trace_count == before + 1


def test_exif_orientation_gives_boxes_in_the_upright_frame(predictor, tmp_path):
  stored = noise(40, 100, seed=4)  # stored 100 wide x 40 high, EXIF: rotate 90 on view
  exif = Image.Exif()
  exif[0x0112] = 6
  path = tmp_path / "phone.jpg"
  Image.fromarray(stored).save(path, exif=exif)
  for image in (str(path), Image.open(path)):
    result = predictor(image, "the red square")
    assert result.image_size == (100, 40)  # (height, width) as viewers show it
    x0, y0, x1, y1 = result.box
    assert x1 <= 40 and y1 <= 100


def test_long_expression_warns_and_is_flagged(predictor, caplog):
  long_text = "the small red square on the left of the big blue circle below the green one"
  with caplog.at_level(logging.WARNING):
    result = predictor(noise(64, 64), long_text)
  assert result.truncated and result.to_json()["truncated"] is True
  assert "truncated" in caplog.text
  assert predictor(noise(64, 64), "the red square").truncated is False


def test_bad_input_is_one_clear_error(predictor, tmp_path):
  from scanformer_jax.errors import UserError
  with pytest.raises(UserError, match="image not found"):
    predictor(str(tmp_path / "nope.png"), "the red square")
  with pytest.raises(UserError, match="empty expression"):
    predictor(noise(64, 64), "   ")
  with pytest.raises(UserError, match="uint8"):
    predictor(np.zeros((8, 8), np.float32), "the red square")


def test_import_stays_light():
  proc = train_helpers.run_python(
      "import sys, scanformer_jax\n"
      "assert 'scanformer_jax.predictor' not in sys.modules\n"
      "assert 'orbax.checkpoint' not in sys.modules\n"
      "assert callable(scanformer_jax.load)\nprint('ok')")
  assert proc.stdout.strip() == "ok"


def test_non_finite_weights_are_refused_in_one_line(predictor, tmp_path):
  """A diverged checkpoint gives NaN boxes: predict and eval refuse, never print NaN."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from scanformer_jax import evaluate  # pylint: disable=g-import-not-at-top
  from scanformer_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from scanformer_jax.predictor import Predictor  # pylint: disable=g-import-not-at-top
  nan_run = dataclasses.replace(predictor.run, params=jax.tree.map(
      lambda x: x * np.nan, predictor.run.params))
  images, texts = _queries(tmp_path)
  with pytest.raises(UserError, match="non-finite boxes"):
    Predictor(nan_run, predictor.tokenizer)(images[0], texts[0])
  with pytest.raises(UserError, match="non-finite boxes"):
    evaluate.refuse_non_finite(np.array([[0.5, np.nan, 0.2, 0.2]]), "eval")
  evaluate.refuse_non_finite(np.array([[0.5, 0.5, 0.2, 0.2]]), "eval")
