"""Example plugin: a dataset (a red and a green square; the text names one)."""

import zlib

import grain
import numpy as np

from scanformer_jax import data_source


def example(seed: int, index: int, size: int, text_len: int) -> dict:
  rng = np.random.default_rng([seed, index])
  image = rng.uniform(-0.3, 0.3, (size, size, 3)).astype(np.float32)
  side = size // 4
  corners = {5: (0, 0), 6: (size - side, size - side)}  # red top-left, green bottom-right
  if rng.random() < 0.5:
    corners = {5: corners[6], 6: corners[5]}
  for token, (x, y) in corners.items():
    image[y:y + side, x:x + side] = (1.0, -1.0, -1.0) if token == 5 else (-1.0, 1.0, -1.0)
  token = int(rng.choice([5, 6]))
  x, y = corners[token]
  text_ids = np.zeros(text_len, np.int32)
  text_ids[:3] = (2, token, 3)  # [CLS] colour [SEP]
  box = np.array([(x + side / 2) / size, (y + side / 2) / size, side / size, side / size],
                 np.float32)
  return {"image": image, "text_ids": text_ids, "text_mask": text_ids > 0, "box": box,
          "valid": np.bool_(True)}


def _batch(seed, indices, size, text_len) -> dict:
  """image [B, R, R, 3] float32, text_ids / text_mask [B, L], box [B, 4] cxcywh, valid [B]."""
  rows = [example(seed, max(int(i), 0), size, text_len) for i in indices]
  for row, i in zip(rows, indices):
    row["valid"] = np.bool_(i >= 0)  # -1: padding of the last evaluation batch
  return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


def _train(config, rows: slice):  # rows: this process's slice of each global batch
  """Endless shuffled batches; a grain iterator, so checkpoints resume it exactly."""
  m, seed = config.model, config.data.seed
  ds = grain.MapDataset.range(1024).shuffle(seed=seed).repeat()
  ds = ds.batch(config.train.batch_size, drop_remainder=True)
  ds = ds.map(lambda idx: _batch(seed, np.asarray(idx)[rows], m.image_size, m.max_text_len))
  return iter(ds.to_iter_dataset())


def _eval(config, split: str, rows: slice):
  m, size = config.model, config.eval.batch_size
  seed = 1 + zlib.crc32(split.encode()) % 1000
  for start in range(0, 32, size):
    indices = np.arange(start, start + size)
    indices = np.where(indices < 32, indices, -1)
    yield _batch(seed, indices[rows], m.image_size, m.max_text_len)


data_source.register("two_squares", data_source.DataSource(train=_train, eval=_eval))
