"""`load()` of a moved run, batch-size buckets, and what a person reads of a result."""

import json
import shutil

import numpy as np
import pytest

import scanformer_jax
from data_pipelines import synthetic
from scanformer_jax import config_io, predictor as predictor_lib, workdir as workdir_lib
from scanformer_jax.errors import UserError
from scanformer_jax.visualize import scan_picture as scan_picture_lib
from tiny_run import tiny_run
from visualize_fixtures import noise

TEXT = "the small red square"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def predictor(run_dir):
  return scanformer_jax.load(run_dir, batch_size=4)


def test_buckets():
  assert predictor_lib.batch_buckets(1) == (1,)
  assert predictor_lib.batch_buckets(8) == (1, 2, 4, 8)
  assert predictor_lib.batch_buckets(6) == (1, 2, 4, 6)
  assert [predictor_lib.bucket_for(n, 6) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]


def test_calls_compile_once_per_bucket(run_dir):
  predictor = scanformer_jax.load(run_dir, batch_size=4)
  images = [noise(40 + 5 * k, 60, seed=k) for k in range(7)]
  texts = [TEXT] * 7
  one = [predictor(im, t).boxes for im, t in zip(images, texts)]  # bucket 1
  assert predictor.trace_count == 1
  for n in (2, 3, 4, 7, 5, 1):  # buckets 2, 4, 4, then streams of full batches of 4
    results = predictor.predict_batch(images[:n], texts[:n])
    for r, expected in zip(results, one):
      np.testing.assert_allclose(r.boxes, expected, atol=1e-2)
  assert predictor.trace_count == 3  # batch sizes 1, 2 and 4


def test_a_moved_run_predicts_from_anywhere(run_dir, predictor, tmp_path, monkeypatch):
  """Copied elsewhere, its vocab path dead, run from `/`: the workdir's vocab.txt."""
  moved = tmp_path / "elsewhere" / "run"
  shutil.copytree(run_dir, moved)
  config = config_io.load_json(str(moved / "config.json"))
  config = config_io.apply_overrides(config, ["data.vocab_path=weights/vilt/vocab.txt"])
  config_io.save_json(config, str(moved / "config.json"))
  monkeypatch.chdir("/")
  with pytest.raises(UserError, match="vocab file not found"):
    scanformer_jax.load(moved)  # nothing bundled yet
  (moved / "vocab.txt").write_text("\n".join(synthetic.vocab()) + "\n", encoding="utf-8")
  moved_predictor = scanformer_jax.load(moved, batch_size=4)
  image = noise(50, 70, seed=9)
  np.testing.assert_allclose(moved_predictor(image, TEXT).boxes, predictor(image, TEXT).boxes,
                             rtol=1e-6)


def test_bundle_vocab_and_an_explicit_path_wins(tmp_path, run_dir):
  vocab = tmp_path / "weights" / "vocab.txt"
  vocab.parent.mkdir()
  vocab.write_text("\n".join(synthetic.vocab()) + "\n", encoding="utf-8")
  config = config_io.load_json(str(run_dir / "config.json"))
  config = config_io.apply_overrides(config, [f"data.vocab_path={vocab}"])
  workdir = tmp_path / "run"
  bundled = workdir_lib.bundle_vocab(config, str(workdir))
  assert open(bundled, encoding="utf-8").read() == vocab.read_text(encoding="utf-8")
  assert workdir_lib.relocated(config, str(workdir)) == config  # the given file exists
  gone = config_io.apply_overrides(config, ["data.vocab_path=/no/such/vocab.txt"])
  assert workdir_lib.relocated(gone, str(workdir)).data.vocab_path == bundled


def test_load_names_what_it_wants(tmp_path):
  with pytest.raises(UserError, match="neither a run directory"):
    scanformer_jax.load(tmp_path)
  doc = scanformer_jax.load.__doc__
  for word in ("workdir", "step", "batch_size", "config", "export", "Prediction"):
    assert word in doc


def test_repr_is_short(predictor):
  result = predictor(noise(64, 64), TEXT)
  text = repr(result)
  assert text.startswith("Prediction(text='the small red square', box=(")
  assert "keep_ratio=(1.00, " in text and "meta" not in text and len(text) < 200


def test_truncated_words_are_marked_in_the_picture(predictor):
  long_text = "the small red square on the left of the big blue circle below the green one"
  image = noise(64, 64)
  result = predictor(image, long_text)
  assert result.truncated and 0 < result.words_read < len(long_text.split())
  read, cut = scan_picture_lib.split_read_words(long_text, result.words_read)
  assert f"{read} {cut}" == long_text
  full = predictor(image, TEXT)
  assert full.words_read is None

  def grey_caption_pixels(prediction):  # the left caption band, in the cut-words colour
    picture = prediction.scan_picture(image)
    band = picture[256:, :256]  # 64 px images are drawn at 256 px
    return int(np.all(band == scan_picture_lib.CUT_COLOUR, axis=-1).sum())

  # Antialiased glyph edges of other text hit the colour now and then; words do often.
  assert grey_caption_pixels(result) > 100 and grey_caption_pixels(full) < 20


def test_empty_text_message_fits_the_api(predictor):
  with pytest.raises(UserError, match="empty expression") as e:
    predictor(noise(64, 64), " \u200b ")
  assert "--text" not in str(e.value) and "name the object" in str(e.value)
  with pytest.raises(UserError, match=r"^texts\[1\]: empty expression"):
    predictor.predict_batch([noise(64, 64)] * 2, [TEXT, ""])


def test_cli_configs_of_a_moved_run_use_its_vocab(run_dir, tmp_path, monkeypatch):
  """eval / calibrate hand the CLI's config to the data pipelines: relocated too."""
  from scanformer_jax import data_source  # pylint: disable=g-import-not-at-top
  from scanformer_jax.cli import common  # pylint: disable=g-import-not-at-top
  moved = tmp_path / "run"
  moved.mkdir()
  config = config_io.load_json(str(run_dir / "config.json"))
  config = config_io.apply_overrides(config, ["data.vocab_path=weights/vilt/vocab.txt"])
  config_io.save_json(config, str(moved / "config.json"))
  (moved / "vocab.txt").write_text("\n".join(synthetic.vocab()) + "\n", encoding="utf-8")
  monkeypatch.chdir("/")
  resolved = common.resolve_config(None, str(moved), ["eval.batch_size=4"])
  assert resolved.data.vocab_path == str(moved / "vocab.txt")
  assert data_source.load_tokenizer(resolved).vocab_size == len(synthetic.vocab())
