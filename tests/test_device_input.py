"""Input transfer: uint8 training batches and the background device prefetch.

The uint8 batch, normalised as the step does, equals the float32 batch; the prefetch
yields the plain iterator's batches, and its checkpoint state is the position after
the batches handed out (not those in flight), so a resume continues exactly.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import fake_data
from data_fixtures import block_sample
from data_pipelines import pipeline
from data_pipelines.contract import DEVICE_KEYS
from scanformer_jax import pixels, prefetch, sharding
from scanformer_jax.config import MeshConfig


def test_uint8_train_batches_normalise_to_the_float32_ones():
  source = [dict(block_sample(i), index=i) for i in range(8)]
  kwargs = dict(image_size=32, max_text_len=8, global_batch_size=4, num_workers=0,
                source=source, seed=3)  # Augmented: content sizes differ per row.
  floats = pipeline.make_train_iter("synthetic", "train", None, **kwargs)
  raw = pipeline.make_train_iter("synthetic", "train", None, uint8_images=True, **kwargs)
  for _ in range(2):
    want, got = next(floats), next(raw)
    assert got["image"].dtype == np.uint8 and got["content_hw"].shape == (4, 2)
    np.testing.assert_array_equal(
        np.asarray(pixels.normalize(got["image"], got["content_hw"])), want["image"])
    for key in ("text_ids", "box", "valid"):
      np.testing.assert_array_equal(got[key], want[key])


def _fake_iter():
  return iter(fake_data.train_dataset(0, 24, 32, 8, 4, slice(0, 4)))


def _mesh():
  return sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])


def test_prefetch_yields_the_batches_and_checkpoints_the_consumed_position():
  plain = _fake_iter()
  with prefetch.DevicePrefetch(_fake_iter(), _mesh(), DEVICE_KEYS, depth=2) as fetched:
    for _ in range(3):
      want, got = next(plain), next(fetched)
      assert set(got) == set(DEVICE_KEYS) and isinstance(got["image"], jax.Array)
      for key in DEVICE_KEYS:
        np.testing.assert_array_equal(np.asarray(got[key]), want[key])
    saved = fetched.get_state()
  # The thread ran ahead, but the saved position is after the 3 batches handed out.
  assert json.loads(saved) == plain.get_state()
  resumed = prefetch.DevicePrefetch(_fake_iter(), _mesh(), DEVICE_KEYS)
  resumed.set_state(saved)
  try:
    np.testing.assert_array_equal(np.asarray(next(resumed)["image"]), next(plain)["image"])
  finally:
    resumed.close()


def test_prefetch_raises_the_sources_error_in_the_consumer():
  def broken():
    yield {k: np.zeros((4,) * (1 if k == "valid" else 2), np.float32) for k in DEVICE_KEYS}
    raise ValueError("bad shard")
  fetched = prefetch.DevicePrefetch(broken(), _mesh(), DEVICE_KEYS)
  next(fetched)
  with pytest.raises(ValueError, match="bad shard"):
    next(fetched)
  fetched.close()
