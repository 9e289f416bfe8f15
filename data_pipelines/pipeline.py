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
  preprocess_single(image, text, tokenizer, image_size, max_len) -> (batch, meta)
      One uint8 [H, W, 3] image + expression -> a B=1 batch (for `predict`).
  load_tokenizer(dataset, data_dir, tokenizer_path, max_len) -> Tokenizer
  eval_samples(dataset, split, data_dir) -> SampleSource  (raw samples, fixed order)

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
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import grain
import numpy as np

from data_pipelines import bad_input, sources, synthetic, transforms
from data_pipelines.bad_input import BadSample
from data_pipelines.contract import BAD_REASONS, PAD_ID
from data_pipelines.errors import DataError
from data_pipelines.tokenizer import Tokenizer
from data_pipelines.transforms import AugmentConfig

_META_DTYPES = {
    "expression": np.object_, "image_id": np.int64, "index": np.int64,
    "object_id": np.int64, "expr_id": np.int64, "orig_size": np.int32,
    "frame_size": np.int32, "scale": np.float32, "offset": np.float32,
    "flip": np.bool_, "box_orig": np.float32, "epoch": np.int32,
    "truncated": np.bool_, "skipped": np.int32, "skipped_prev": np.int32,
}


def default_num_workers() -> int:
  """Worker processes: none on small machines (threads suffice), else a few."""
  cpus = os.cpu_count() or 1
  return 0 if cpus <= 4 else min(8, cpus // 2)


def default_read_threads() -> int:
  return max(2, min(8, os.cpu_count() or 1))


# ------------------------------------------------------------------ tokenizer
def load_tokenizer(dataset: str, data_dir: str | os.PathLike | None,
                   tokenizer_path: str | os.PathLike | None, max_len: int) -> Tokenizer:
  """`tokenizer_path` (a BERT vocab.txt) if given; the synthetic vocab for synthetic."""
  if tokenizer_path:
    return Tokenizer(tokenizer_path, max_len)
  if dataset == "synthetic" or dataset.startswith("synthetic/"):
    return Tokenizer(synthetic.vocab(), max_len)
  raise DataError(
      f"dataset {dataset!r} needs a BERT-uncased vocab.txt (tokenizer_path / "
      "--tokenizer-path): the one shipped with a converted ViLT checkpoint, or "
      "bert-base-uncased's vocab.txt.")


# ------------------------------------------------------------ per-sample work
def _row_meta(raw: dict[str, Any], expression: str, size_hw: tuple[int, int],
              geom: transforms.Geometry | None, box: np.ndarray, frame: int,
              truncated: bool) -> dict[str, Any]:
  g = geom
  return {
      "expression": expression, "image_id": raw.get("image_id", -1),
      "index": raw.get("index", -1), "object_id": raw.get("object_id", -1),
      "expr_id": raw.get("expr_id", -1), "orig_size": np.array(size_hw, np.int32),
      "frame_size": frame,
      "scale": np.array([g.sx, g.sy] if g else [1, 1], np.float32),
      "offset": np.array([g.ox, g.oy] if g else [0, 0], np.float32),
      "flip": bool(g.flip) if g else False, "box_orig": np.asarray(box, np.float32),
      "epoch": raw.get("epoch", 0), "truncated": truncated,
      "skipped": np.zeros(len(BAD_REASONS), np.int32),
      "skipped_prev": np.zeros(len(BAD_REASONS), np.int32),
  }


class SampleProcessor:
  """raw sample -> one contract row; `{"bad": reason}` for a bad sample.

  With `augment` (training) it needs the per-sample rng that grain's random_map
  passes; without, it letterboxes the whole image. `tokenizer=None` skips text ids.
  """

  def __init__(self, image_size: int, max_text_len: int, tokenizer: Tokenizer | None,
               augment: AugmentConfig | None = None):
    self.image_size = image_size
    self.max_text_len = max_text_len
    self.tokenizer = tokenizer
    self.augment = augment

  def __call__(self, raw: dict[str, Any], rng: np.random.Generator | None = None):
    try:
      return self.process(raw, rng)
    except BadSample as e:
      return {"bad": e.reason, "raw": {"index": raw.get("index", -1),
                                       "image_id": raw.get("image_id", -1),
                                       "epoch": raw.get("epoch", 0)}}

  def process(self, raw: dict[str, Any], rng: np.random.Generator | None) -> dict:
    r = self.image_size
    text = bad_input.check_expression(raw["expression"])
    img = transforms.open_image(raw["image"])
    width, height = img.size
    box = np.asarray(raw["box"], np.float64)
    if raw.get("box_format") == "yxyx_norm":
      box = transforms.yxyx_norm_to_xyxy(box, height, width)
    box = bad_input.check_box(box, width, height)
    aug = self.augment
    if aug is not None:
      geom = transforms.random_geometry(rng, width, height, box, r, aug)
    else:
      geom = transforms.letterbox_geometry(width, height, r)
    content = transforms.render(img, geom)
    if aug is not None and aug.jitter > 0:
      content = transforms.color_jitter(content, rng, aug.jitter)
    if geom.flip:
      text = transforms.swap_left_right(text)
    fbox = geom.apply(box)
    fbox = np.clip(fbox, 0, [geom.out_w, geom.out_h, geom.out_w, geom.out_h])
    if self.tokenizer is not None:
      ids, mask, truncated = self.tokenizer.encode(text)
    else:
      ids = np.full((self.max_text_len,), PAD_ID, np.int32)
      mask, truncated = np.zeros((self.max_text_len,), np.bool_), False
    return {
        # uint8 content only; `collate` normalizes it into the padded R x R frame.
        "pixels": np.asarray(content, np.uint8),  # [h, w, 3]
        "text_ids": ids, "text_mask": mask,  # [L]
        "box": transforms.xyxy_to_cxcywh(fbox / r).astype(np.float32),  # [4]
        "valid": True,
        "meta": _row_meta(raw, text, (height, width), geom, box, r, truncated),
    }


def pad_row(image_size: int, max_text_len: int, bad: dict | None = None) -> dict:
  """A valid=False row: eval padding, or (with `bad`) a bad eval sample."""
  r = image_size
  raw = dict(bad["raw"]) if bad else {}
  meta = _row_meta(raw, "", (0, 0), None, np.zeros(4), r, False)
  if bad:
    meta["skipped"][BAD_REASONS.index(bad["bad"])] = 1
  return {"pixels": np.zeros((0, 0, 3), np.uint8),
          "text_ids": np.full((max_text_len,), PAD_ID, np.int32),
          "text_mask": np.zeros((max_text_len,), np.bool_),
          "box": np.zeros((4,), np.float32), "valid": False, "meta": meta}


def collate(rows: Sequence[dict]) -> dict[str, Any]:
  """Stacks rows into a contract batch (meta: one numpy array per field).

  Images are normalized straight into the batch array (one pass over the pixels).
  """
  r = int(rows[0]["meta"]["frame_size"])
  image = np.zeros((len(rows), r, r, 3), np.float32)  # [B, R, R, 3]; PAD_VALUE is 0
  for i, row in enumerate(rows):
    transforms.normalize_into(image[i], row["pixels"])
  batch = {"image": image}
  batch.update({k: np.stack([row[k] for row in rows]) for k in ("text_ids", "text_mask", "box")})
  batch["valid"] = np.array([row["valid"] for row in rows], np.bool_)
  meta = {}
  for k, dtype in _META_DTYPES.items():
    if dtype is np.object_:
      arr = np.empty((len(rows),), np.object_)
      arr[:] = [row["meta"][k] for row in rows]
    else:
      arr = np.stack([np.asarray(row["meta"][k]) for row in rows]).astype(dtype)
    meta[k] = arr
  batch["meta"] = meta
  return batch


# ------------------------------------------------------------ grain plumbing
class _TagEpoch:
  """map_with_index: remembers which epoch of the repeated shard a sample is from."""

  def __init__(self, epoch_len: int):
    self.epoch_len = epoch_len

  def __call__(self, index: int, raw: dict) -> dict:
    return dict(raw, epoch=int(index) // self.epoch_len)


class _SkipBadIterator(grain.DatasetIterator):
  """Drops bad rows; their reasons are added to the next good row's meta.skipped."""

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)

  def __next__(self) -> dict:
    bad = []  # (epoch, reason index) of the bad samples before the next good one
    while True:
      row = next(self._parent)
      if "bad" in row:
        bad.append((row["raw"]["epoch"], BAD_REASONS.index(row["bad"])))
        continue
      meta = row["meta"]
      for epoch, reason in bad:  # same epoch as this row, or the one before
        meta["skipped" if epoch == meta["epoch"] else "skipped_prev"][reason] += 1
      return row

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


class _SkipBad(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset):
    super().__init__(parent)

  def __iter__(self) -> _SkipBadIterator:
    return _SkipBadIterator(self._parent.__iter__())


class DataIterator(grain.DatasetIterator):
  """The iterator the trainer holds: a grain DatasetIterator (checkpointable) that
  also counts used / bad / truncated samples per epoch (`stats`) and logs them."""

  def __init__(self, parent: grain.DatasetIterator, stats: bad_input.SkipStats,
               num_batches: int | None, tokenizer: Tokenizer | None):
    super().__init__(parent)
    self.stats = stats
    self.num_batches = num_batches  # eval: batches per process; train: None
    self.tokenizer = tokenizer

  def __next__(self) -> dict[str, Any]:
    try:
      batch = next(self._parent)
    except StopIteration:
      self.close()  # finite (eval) pipeline done: release worker processes now
      self.stats.end_epoch()
      raise
    meta, valid = batch["meta"], batch["valid"]
    for e in sorted(set(meta["epoch"].tolist())):
      rows = meta["epoch"] == e
      prev = meta["skipped_prev"][rows].sum(0)
      if prev.any():
        self.stats.update(epoch=e - 1, good=0, bad=prev, truncated=0)
      self.stats.update(epoch=e, good=int((valid & rows).sum()),
                        bad=meta["skipped"][rows].sum(0),
                        truncated=int(meta["truncated"][valid & rows].sum()))
    return batch

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


class _Account(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, stats, num_batches, tokenizer):
    super().__init__(parent)
    self._args = (stats, num_batches, tokenizer)

  def __iter__(self) -> DataIterator:
    return DataIterator(self._parent.__iter__(), *self._args)


def _mp_prefetch(it: grain.IterDataset, workers: int, buffer: int) -> grain.IterDataset:
  """grain worker processes. grain reads absl flags there; programs that do not use
  absl (ours use argparse) never parse them, so mark them parsed (defaults)."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=buffer))


def _per_process_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise DataError(f"global_batch_size {global_batch_size} is not divisible by "
                    f"process_count {process_count}")
  return global_batch_size // process_count


# -------------------------------------------------------------- entry points
def make_train_iter(dataset: str, split: str, data_dir: str | os.PathLike, *,
                    image_size: int, max_text_len: int, global_batch_size: int,
                    seed: int = 0, num_workers: int | None = None,
                    process_index: int = 0, process_count: int = 1,
                    tokenizer_path: str | os.PathLike | None = None,
                    augment: AugmentConfig | None = AugmentConfig(),
                    max_bad_fraction: float = 0.01,
                    read_threads: int | None = None,
                    source: Sequence[dict] | None = None) -> DataIterator:
  """Endless training batches for this process (see the module docstring).

  `source` replaces the dataset lookup with any sequence of raw samples (tests).
  """
  b = _per_process_batch(global_batch_size, process_count)
  src = source if source is not None else sources.SampleSource(dataset, split, data_dir)
  tok = load_tokenizer(dataset, data_dir, tokenizer_path, max_text_len)
  ds = grain.MapDataset.source(src)[process_index::process_count]
  if len(ds) < b:
    raise DataError(f"{dataset}:{split} has {len(ds)} samples for this process, fewer "
                    f"than one batch of {b}")
  epoch_len = len(ds)
  ds = ds.seed(seed).shuffle().repeat(None).map_with_index(_TagEpoch(epoch_len))
  ds = ds.random_map(SampleProcessor(image_size, max_text_len, tok,
                                     augment or transforms.NO_AUGMENT))
  threads = default_read_threads() if read_threads is None else read_threads
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                            prefetch_buffer_size=max(2 * b, 8)))
  it = _SkipBad(it).batch(b, drop_remainder=True, batch_fn=collate)
  workers = default_num_workers() if num_workers is None else num_workers
  if workers > 0:
    it = _mp_prefetch(it, workers, 2)
  else:  # batch in a background thread, so `next` does not pay for collating
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=2)
  name = getattr(src, "name", dataset)
  stats = bad_input.SkipStats(f"{name} (train)", max_bad_fraction)
  return iter(_Account(it, stats, None, tok))


class _EvalSource:
  """This process's shard of the samples, padded with `{"pad": True}` to `total`.

  (grain treats None items as filtered out, so padding is a marker dict.)"""

  def __init__(self, src: Sequence[dict], process_index: int, process_count: int,
               total: int):
    self.src, self.pi, self.pc, self.total = src, process_index, process_count, total
    self.n = len(range(process_index, len(src), process_count))

  def __len__(self) -> int:
    return self.total

  def __getitem__(self, i: int) -> dict:
    return self.src[self.pi + int(i) * self.pc] if i < self.n else {"pad": True}


class _EvalRow:

  def __init__(self, proc: SampleProcessor):
    self.proc = proc

  def __call__(self, raw: dict) -> dict:
    if raw.get("pad"):
      return pad_row(self.proc.image_size, self.proc.max_text_len)
    row = self.proc(raw)
    if "bad" in row:
      return pad_row(self.proc.image_size, self.proc.max_text_len, bad=row)
    return row


def eval_samples(dataset: str, split: str, data_dir: str | os.PathLike) -> sources.SampleSource:
  return sources.SampleSource(dataset, split, data_dir)


def make_eval_iter(dataset: str, split: str, data_dir: str | os.PathLike, *,
                   image_size: int, max_text_len: int, global_batch_size: int,
                   process_index: int = 0, process_count: int = 1,
                   tokenizer_path: str | os.PathLike | None = None,
                   num_workers: int | None = None, max_bad_fraction: float = 0.01,
                   read_threads: int | None = None,
                   source: Sequence[dict] | None = None,
                   tokenize: bool = True) -> DataIterator:
  """Each expression once, fixed order, padded (see the module docstring)."""
  b = _per_process_batch(global_batch_size, process_count)
  src = source if source is not None else sources.SampleSource(dataset, split, data_dir)
  tok = load_tokenizer(dataset, data_dir, tokenizer_path, max_text_len) if tokenize else None
  num_batches = max(1, math.ceil(len(src) / global_batch_size))
  shard = _EvalSource(src, process_index, process_count, num_batches * b)
  proc = SampleProcessor(image_size, max_text_len, tok, None)
  ds = grain.MapDataset.source(shard).map(_EvalRow(proc)).batch(b, batch_fn=collate)
  threads = default_read_threads() if read_threads is None else read_threads
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2))
  workers = default_num_workers() if num_workers is None else num_workers
  if workers > 0:
    it = _mp_prefetch(it, workers, 1)
  name = getattr(src, "name", dataset)
  stats = bad_input.SkipStats(f"{name} (eval)", max_bad_fraction)
  return iter(_Account(it, stats, num_batches, tok))


def preprocess_single(image: np.ndarray, text: str, tokenizer: Tokenizer,
                      image_size: int, max_len: int) -> tuple[dict[str, Any], dict]:
  """One uint8 [H, W, 3] image + expression -> (B=1 batch, its meta).

  Map the model's box back with `transforms.box_to_original_pixels(box[0],
  {k: v[0] for k, v in meta.items()})` or directly on the [1, 4] batch.
  """
  from PIL import Image
  arr = np.asarray(image)
  if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
    raise DataError(f"expected a uint8 [H, W, 3] image, got {arr.dtype} {arr.shape}")
  if not " ".join(str(text).split()):
    raise DataError("the expression is empty")
  h, w = arr.shape[:2]
  raw = {"image": Image.fromarray(arr), "expression": text, "box": [0.0, 0.0, w, h],
         "box_format": "xyxy"}
  row = SampleProcessor(image_size, max_len, tokenizer, None).process(raw, None)
  batch = collate([row])
  batch["box"][:] = 0.0  # no ground truth
  batch["meta"]["box_orig"][:] = 0.0
  return batch, batch["meta"]


def load_image_file(path: str | os.PathLike) -> np.ndarray:
  """Reads an image file as uint8 [H, W, 3]; DataError if missing / unreadable."""
  from PIL import Image
  try:
    with Image.open(path) as img:
      return np.asarray(img.convert("RGB"), np.uint8)
  except FileNotFoundError:
    raise DataError(f"image not found: {path}") from None
  except Exception as e:
    raise DataError(f"cannot read image {path}: {e}") from None
