"""grain input pipelines: training (shuffled, augmented, endless) and evaluation.

Public entry points (the trainer / evaluator / predictor call these):

  make_train_iter(dataset, split, data_dir, *, image_size, max_text_len,
                  global_batch_size, seed=0, num_workers=None, process_index=0,
                  process_count=1, tokenizer_path=None, augment=AugmentConfig(),
                  max_bad_fraction=0.01) -> DataIterator
      Endless; epochs reshuffled (seeded); batches of global_batch_size //
      process_count rows for THIS process (disjoint per-process shards); drop
      remainder. Bad samples are skipped.
  make_eval_iter(dataset, split, data_dir, *, image_size, max_text_len,
                 global_batch_size, process_index=0, process_count=1,
                 tokenizer_path=None, num_workers=None, max_bad_fraction=0.01)
                 -> DataIterator
      Every expression of the split exactly once, in a fixed order; every process
      yields the same number of batches (`it.num_batches`); padding rows (and bad
      samples) have valid=False. Ends with StopIteration.
The single-image path of `predict` (`load_image_file`, `preprocess_single`) and the
per-sample work are in `processing`; the grain plumbing in `grain_ops`.

Batches follow `data_pipelines.contract` (numpy; `meta` stays on the host).

Checkpointing: the returned `DataIterator` IS a grain `DatasetIterator`, so either
  state = it.get_state(); ...; it.set_state(state)        (a JSON-able dict), or
  orbax: CheckpointManager item `grain.checkpoint.CheckpointHandler` with
  `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`.
Rebuild the iterator with the same arguments (dataset, seed, batch size, process
count, num_workers), then restore: the batches continue exactly. The order depends on
`num_workers` (each worker batches its own slice), so keep it fixed across resumes.

Pipeline: SampleSource (flattened ArrayRecord) -> MapDataset -> shard -> seeded
shuffle -> repeat -> per-sample decode/letterbox/augment/tokenize (seeded per index)
-> to_iter_dataset (thread prefetch) -> skip bad -> batch -> mp_prefetch (workers) or
a background batching thread ->
DataIterator (counts bad samples per epoch, logs them, enforces max_bad_fraction).
With `ready_rows=True` (no augmentation) the per-sample work is done once into
memory-mapped uint8 arrays (`ready_rows`), which the same shard / shuffle / repeat
then reads a batch at a time.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import grain
import numpy as np

from data_pipelines import bad_input, grain_ops, sources, transforms
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines import ready_rows as ready_rows_lib
from data_pipelines.errors import DataError
from data_pipelines.grain_ops import DataIterator
from data_pipelines.processing import EvalRow, SampleProcessor, collate
from data_pipelines.transforms import AugmentConfig


def make_train_iter(dataset: str, split: str, data_dir: str | os.PathLike, *,
                    image_size: int, max_text_len: int, global_batch_size: int,
                    seed: int = 0, num_workers: int | None = None,
                    process_index: int = 0, process_count: int = 1,
                    tokenizer_path: str | os.PathLike | None = None,
                    augment: AugmentConfig | None = AugmentConfig(),
                    max_bad_fraction: float = 0.01,
                    read_threads: int | None = None,
                    source: Sequence[dict] | None = None,
                    uint8_images: bool = False, ready_rows: bool = False,
                    ready_dir: str | os.PathLike | None = None) -> DataIterator:
  """Endless training batches for this process (see the module docstring).

  `source` replaces the dataset lookup with any sequence of raw samples (tests).
  `uint8_images`: `image` stays uint8 (`collate_uint8`), 4x fewer bytes to the device.
  `ready_rows`: read the split's rows processed once (`ready_rows`, built on first use
  under `ready_dir`, default <data_dir>/ready) instead of decoding every sample every
  epoch: the same batches; needs `augment=None` and `uint8_images`; `num_workers` unused.
  """
  b = grain_ops.per_process_batch(global_batch_size, process_count)
  src = source if source is not None else sources.SampleSource(dataset, split, data_dir)
  tok = tokenizer_lib.for_dataset(dataset, tokenizer_path, max_text_len)
  name = getattr(src, "name", dataset)
  if ready_rows:
    if augment is not None:
      raise DataError("ready rows are processed once, so they cannot be augmented: "
                      "set data.augment=False (or data.ready_rows=False)")
    if not uint8_images:
      raise DataError("ready rows hold uint8 images: pass uint8_images=True")
    root = ready_dir if ready_dir is not None else _ready_root(data_dir)
    threads = grain_ops.default_read_threads() if read_threads is None else read_threads
    arrays, _ = ready_rows_lib.get_or_build(
        src, root, dataset=dataset, split=getattr(src, "split", split), image_size=image_size,
        max_text_len=max_text_len, tokenizer=tok, max_bad_fraction=max_bad_fraction,
        threads=threads)
    return ready_rows_lib.train_iter(arrays, batch_size=b, seed=seed,
                                     process_index=process_index,
                                     process_count=process_count, name=name,
                                     max_bad_fraction=max_bad_fraction, tokenizer=tok)
  ds = grain.MapDataset.source(src)[process_index::process_count]
  if len(ds) < b:
    raise DataError(f"{dataset}:{split} has {len(ds)} samples for this process, fewer "
                    f"than one batch of {b}")
  epoch_len = len(ds)
  ds = ds.seed(seed).shuffle().repeat(None).map_with_index(grain_ops.TagEpoch(epoch_len))
  ds = ds.random_map(SampleProcessor(image_size, max_text_len, tok,
                                     augment or transforms.NO_AUGMENT))
  threads = grain_ops.default_read_threads() if read_threads is None else read_threads
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                            prefetch_buffer_size=max(2 * b, 8)))
  it = grain_ops.SkipBad(it).batch(b, drop_remainder=True,
                                   batch_fn=collate_uint8 if uint8_images else collate)
  workers = grain_ops.default_num_workers() if num_workers is None else num_workers
  if workers > 0:
    it = grain_ops.mp_prefetch(it, workers, 2)
  else:  # batch in a background thread, so `next` does not pay for collating
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=2)
  stats = bad_input.SkipStats(f"{name} (train)", max_bad_fraction)
  return iter(grain_ops.Account(it, stats, None, tok))


def _ready_root(data_dir: str | os.PathLike | None) -> str:
  """<data_dir>/ready: a local directory (the rows are memory-mapped)."""
  path = os.fspath(data_dir) if data_dir is not None else ""
  if not path or "://" in path:
    raise DataError(f"ready rows are memory-mapped from a local directory, and data_dir "
                    f"{path!r} is not one: set data.ready_rows=False")
  return os.path.join(path, "ready")


def collate_uint8(rows: Sequence[dict]) -> dict:
  """`collate`, with `image` uint8 [B, R, R, 3] (content top-left, 0 elsewhere) and
  `content_hw` int32 [B, 2]; the step normalises it (scanformer_jax.pixels) exactly
  as `collate` would have on the host."""
  hw = np.array([row["pixels"].shape[:2] for row in rows], np.int32)  # [B, 2]
  empty = np.zeros((0, 0, 3), np.uint8)
  batch = collate([dict(row, pixels=empty) for row in rows])  # Image left untouched.
  r = batch["image"].shape[1]
  image = np.zeros((len(rows), r, r, 3), np.uint8)  # [B, R, R, 3]
  for i, row in enumerate(rows):
    h, w = hw[i]
    image[i, :h, :w] = row["pixels"]
  batch["image"], batch["content_hw"] = image, hw
  return batch


def make_eval_iter(dataset: str, split: str, data_dir: str | os.PathLike, *,
                   image_size: int, max_text_len: int, global_batch_size: int,
                   process_index: int = 0, process_count: int = 1,
                   tokenizer_path: str | os.PathLike | None = None,
                   num_workers: int | None = None, max_bad_fraction: float = 0.01,
                   read_threads: int | None = None,
                   source: Sequence[dict] | None = None,
                   tokenize: bool = True) -> DataIterator:
  """Each expression once, fixed order, padded (see the module docstring)."""
  b = grain_ops.per_process_batch(global_batch_size, process_count)
  src = source if source is not None else sources.SampleSource(dataset, split, data_dir)
  tok = tokenizer_lib.for_dataset(dataset, tokenizer_path, max_text_len) if tokenize else None
  num_batches = max(1, math.ceil(len(src) / global_batch_size))
  shard = grain_ops.EvalSource(src, process_index, process_count, num_batches * b)
  proc = SampleProcessor(image_size, max_text_len, tok, None)
  ds = grain.MapDataset.source(shard).map(EvalRow(proc)).batch(b, batch_fn=collate)
  threads = grain_ops.default_read_threads() if read_threads is None else read_threads
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2))
  workers = grain_ops.default_num_workers() if num_workers is None else num_workers
  if workers > 0:
    it = grain_ops.mp_prefetch(it, workers, 1)
  name = getattr(src, "name", dataset)
  stats = bad_input.SkipStats(f"{name} (eval)", max_bad_fraction)
  return iter(grain_ops.Account(it, stats, num_batches, tok))
