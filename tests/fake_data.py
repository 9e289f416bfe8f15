"""A tiny generated REC task as a grain pipeline, for the trainer tests.

Importing this module registers it as `data.dataset="fake"` (`data_source.register`;
tests/conftest.py and tests/fake_tiny_config.py import it, so in-process tests and
CLI subprocesses started with that config both see it). Each image shows two squares
(token 5 = the red one, token 6 = the green one) on noise; the expression names one, the box is that square. No
files, no TFDS; batches follow the batch contract and the iterator is a grain
`DatasetIterator`, so checkpointing and resume take the same path as real data.
Every process builds the same global batch and keeps its own rows, so any process
layout sees exactly the batches of a single-process run.
"""

from __future__ import annotations

import zlib

import grain
import numpy as np

from scanformer_jax import data_source

NAME = "fake"
TRAIN_EXAMPLES = 4096
EVAL_EXAMPLES = 64

RED_TOKEN, GREEN_TOKEN, CLS, SEP = 5, 6, 2, 3
COLOURS = {RED_TOKEN: (1.0, -1.0, -1.0), GREEN_TOKEN: (-1.0, 1.0, -1.0)}


def make_example(seed: int, index: int, image_size: int, text_len: int) -> dict:
  rng = np.random.default_rng([seed, index])
  r = image_size
  image = rng.uniform(-0.3, 0.3, (r, r, 3)).astype(np.float32)
  side = int(r * rng.uniform(0.15, 0.3))
  boxes = {}
  for token, colour in COLOURS.items():
    for _ in range(20):  # Place without overlapping the other square.
      x0, y0 = rng.integers(0, r - side, 2)
      box = np.array([x0, y0, x0 + side, y0 + side])
      if all(_disjoint(box, other) for other in boxes.values()):
        break
    boxes[token] = box
    image[box[1]:box[3], box[0]:box[2]] = colour
  target = RED_TOKEN if rng.random() < 0.5 else GREEN_TOKEN
  x0, y0, x1, y1 = boxes[target] / r
  text_ids = np.zeros(text_len, np.int32)
  text_ids[:3] = (CLS, target, SEP)
  return {
      "image": image,
      "text_ids": text_ids,
      "text_mask": text_ids > 0,
      "box": np.array([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], np.float32),
      "valid": np.bool_(True),
      "index": np.int64(index),
  }


def _disjoint(a, b) -> bool:
  return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def _stack(rows: list[dict]) -> dict:
  batch = {k: np.stack([row[k] for row in rows]) for k in rows[0] if k != "index"}
  batch["meta"] = {"index": np.stack([row["index"] for row in rows])}
  return batch


def train_dataset(seed: int, num_examples: int, image_size: int, text_len: int,
                  global_batch: int, rows: slice) -> grain.IterDataset:
  """Endless shuffled global batches; this process keeps `rows` of each."""
  def build(indices):
    return _stack([make_example(seed, int(i), image_size, text_len) for i in indices[rows]])
  ds = grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat()
  return ds.batch(global_batch, drop_remainder=True).map(build).to_iter_dataset()


def eval_dataset(seed: int, num_examples: int, image_size: int, text_len: int,
                 global_batch: int, rows: slice) -> grain.IterDataset:
  """Every example once, in order; the last batch padded with `valid=False` rows."""
  def build(indices):
    indices = np.asarray(indices)
    padded = np.concatenate([indices, np.full(global_batch - len(indices), -1)])
    out = []
    for i in padded[rows]:
      row = make_example(seed, max(int(i), 0), image_size, text_len)
      if i < 0:
        row["valid"], row["index"] = np.bool_(False), np.int64(-1)
      out.append(row)
    return _stack(out)
  ds = grain.MapDataset.range(num_examples).batch(global_batch, drop_remainder=False)
  return ds.map(build).to_iter_dataset()


def _train_iterator(config, rows: slice):
  m = config.model
  return iter(train_dataset(config.data.seed, TRAIN_EXAMPLES, m.image_size, m.max_text_len,
                            config.train.batch_size, rows))


def _eval_iterator(config, split: str, rows: slice):
  m = config.model
  seed = config.data.seed + 1 + zlib.crc32(split.encode()) % 1000
  return iter(eval_dataset(seed, EVAL_EXAMPLES, m.image_size, m.max_text_len,
                           config.eval.batch_size, rows))


data_source.register(NAME, data_source.DataSource(train=_train_iterator, eval=_eval_iterator))
