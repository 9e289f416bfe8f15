"""Ready rows: a training split processed once into uint8 arrays, then trained from
by memory map (no image decode, letterbox or tokenization in the training loop).

Without augmentation every epoch repeats the same per-sample work. `get_or_build`
does it once, with the pipeline's own `SampleProcessor` (so the rows are
bit-identical to the decoding pipeline's), and stores one .npy per field under
`<root>/<cache_name(...)>/`, plus manifest.json:

  image       [N, R, R, 3] uint8  content top-left, 0 elsewhere (as `collate_uint8`)
  content_hw  [N, 2] int32        the content's (height, width)
  text_ids    [N, L] int32,  text_mask [N, L] bool,  box [N, 4] float32
  position    [N] int64           the sample's position in the source (the shard key)
  the static `meta` fields of the contract (expression as fixed-width unicode)
  bad_position [K] int64, bad_reason [K] int8   samples left out, by BAD_REASONS index

A build is written to a temporary directory and renamed into place, so a killed
build never leaves a cache that gets used; a cache that does not load (a missing
file, a wrong shape, another source build) is rebuilt with a warning.

`train_iter` reads the rows into the batches of `pipeline.make_train_iter(...,
uint8_images=True)`: the same process shard (source position % process_count), the
same seeded shuffle, epochs and checkpointable state, one fancy index per field and
batch. The build-time skips are counted on the first row of every epoch, so the
per-epoch bad-sample log and `max_bad_fraction` see them as before.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import grain
import numpy as np

from data_pipelines import bad_input, grain_ops
from data_pipelines.contract import BAD_REASONS
from data_pipelines.errors import DataError
from data_pipelines.processing import SampleProcessor
from data_pipelines.tokenizer import Tokenizer

log = logging.getLogger("data_pipelines")

# Bump when what a row holds or how it is processed changes: old caches then miss.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Rows processed between progress updates and held in flight by the build threads.
_BUILD_PREFETCH = 64
# Rows copied at a time when a build with bad samples is compacted.
_COPY_CHUNK = 1024

# The static meta fields stored per row: name -> (row shape, dtype). `epoch`,
# `skipped` and `skipped_prev` depend on where a row is drawn, not on the sample.
_META_FIELDS = {
    "image_id": ((), np.int64), "index": ((), np.int64), "object_id": ((), np.int64),
    "expr_id": ((), np.int64), "orig_size": ((2,), np.int32),
    "frame_size": ((), np.int32), "scale": ((2,), np.float32),
    "offset": ((2,), np.float32), "flip": ((), np.bool_),
    "box_orig": ((4,), np.float32), "truncated": ((), np.bool_),
}


def _row_fields(image_size: int, max_text_len: int) -> dict[str, tuple[tuple, Any]]:
  """Every fixed-width array of a cache: name -> (row shape, dtype)."""
  r, l = image_size, max_text_len
  return {"image": ((r, r, 3), np.uint8), "content_hw": ((2,), np.int32),
          "text_ids": ((l,), np.int32), "text_mask": ((l,), np.bool_),
          "box": ((4,), np.float32), "position": ((), np.int64), **_META_FIELDS}


def vocab_hash(tokenizer: Tokenizer) -> str:
  """A short hash of what decides the text ids: the vocab and lowercasing."""
  text = json.dumps([tokenizer.tokens, tokenizer.lowercase])
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def cache_name(dataset: str, split: str, image_size: int, max_text_len: int,
               tokenizer: Tokenizer) -> str:
  """The cache directory's name: every input that changes a row's content."""
  safe = re.sub(r"[^A-Za-z0-9._-]+", "+", f"{dataset}-{split}")
  return (f"{safe}-r{image_size}-l{max_text_len}-v{vocab_hash(tokenizer)}"
          f"-f{FORMAT_VERSION}")


def source_fingerprint(src: Sequence[dict]) -> str:
  """Which build of the data the rows come from (a rebuilt dataset misses the cache)."""
  fingerprint = getattr(src, "fingerprint", None)
  return str(fingerprint) if fingerprint is not None else f"{type(src).__name__}:{len(src)}"


class _Unusable(Exception):
  """A cache directory that exists but cannot be used (why)."""


def load(path: Path, expect: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
  """The memory-mapped arrays and manifest at `path`; _Unusable when any file is
  missing or does not match the manifest, `expect` (its identifying entries) or the
  row shapes."""
  try:
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise _Unusable(f"no readable {MANIFEST}: {e}") from None
  if not isinstance(manifest, dict):
    raise _Unusable(f"{MANIFEST} is not a JSON object")
  for key, want in expect.items():
    if manifest.get(key) != want:
      raise _Unusable(f"{key} is {manifest.get(key)!r}, not {want!r}")
  try:
    n, k = int(manifest["num_rows"]), sum(int(v) for v in manifest["bad"].values())
    fields = _row_fields(int(manifest["image_size"]), int(manifest["max_text_len"]))
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise _Unusable(f"{MANIFEST} lacks {e}") from None
  want_shapes = {name: ((n, *shape), np.dtype(dtype)) for name, (shape, dtype) in fields.items()}
  want_shapes["bad_position"] = ((k,), np.dtype(np.int64))
  want_shapes["bad_reason"] = ((k,), np.dtype(np.int8))
  arrays = {}
  try:
    for name, (shape, dtype) in want_shapes.items():
      arr = np.load(path / f"{name}.npy", mmap_mode="r")
      if arr.shape != shape or arr.dtype != dtype:
        raise _Unusable(f"{name}.npy is {arr.dtype} {arr.shape}, not {dtype} {shape}")
      arrays[name] = arr
    expression = np.load(path / "expression.npy", mmap_mode="r")
  except (OSError, ValueError) as e:
    raise _Unusable(f"unreadable array: {e}") from None
  if expression.shape != (n,) or expression.dtype.kind != "U":
    raise _Unusable(f"expression.npy is {expression.dtype} {expression.shape}, not "
                    f"unicode ({n},)")
  arrays["expression"] = expression
  return arrays, manifest


def get_or_build(src: Sequence[dict], root: str | os.PathLike, *, dataset: str, split: str,
                 image_size: int, max_text_len: int, tokenizer: Tokenizer,
                 max_bad_fraction: float, threads: int = 2
                 ) -> tuple[dict[str, np.ndarray], dict]:
  """The ready rows of `src` under `root` (built first if missing or unusable)."""
  root = Path(os.fspath(root))
  name = cache_name(dataset, split, image_size, max_text_len, tokenizer)
  path = root / name
  expect = {"format": FORMAT_VERSION, "dataset": dataset, "split": split,
            "image_size": image_size, "max_text_len": max_text_len,
            "vocab_hash": vocab_hash(tokenizer), "source": source_fingerprint(src)}
  if path.exists():
    try:
      return load(path, expect)
    except _Unusable as e:
      log.warning("ready rows %s unusable (%s): rebuilding them", path, e)
  tmp = None
  try:
    root.mkdir(parents=True, exist_ok=True)
    _remove_orphans(root, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-",
                                dir=root))
    _write(src, tmp, expect, tokenizer, max_bad_fraction, threads)
    _publish(tmp, path)
  except OSError as e:
    raise DataError(f"cannot write the ready rows under {root}: {e.strerror or e}; make "
                    "it writable (and free space) or set data.ready_rows=False") from None
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  try:
    return load(path, expect)
  except _Unusable as e:  # e.g. another process replaced them meanwhile
    raise DataError(f"the ready rows just built at {path} do not load ({e}); build them "
                    "again or set data.ready_rows=False") from None


def _remove_orphans(root: Path, name: str) -> None:
  """Deletes temporary directories of builds on this host whose process is gone."""
  prefix = f".{name}.tmp-{socket.gethostname()}-"
  for tmp in root.glob(f"{glob.escape(prefix)}*"):
    pid = tmp.name[len(prefix):].partition("-")[0]
    if pid.isdigit() and not _alive(int(pid)):
      shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _publish(tmp: Path, path: Path) -> None:
  """Moves the finished build into place, replacing what is there (an unusable
  cache); when another process's build lands there first, that one stays."""
  if path.exists():
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    with contextlib.suppress(FileNotFoundError):
      os.rename(path, old / "rows")
    shutil.rmtree(old, ignore_errors=True)
  try:
    os.rename(tmp, path)
  except OSError:
    if not path.is_dir():
      raise


def _write(src: Sequence[dict], out: Path, expect: dict, tokenizer: Tokenizer,
           max_bad_fraction: float, threads: int) -> None:
  """Processes every sample of `src` into the arrays and manifest under `out`."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  n, r, l = len(src), expect["image_size"], expect["max_text_len"]
  if n == 0:
    raise DataError(f"{expect['dataset']}:{expect['split']} has no samples")
  _check_disk(out, n * r * r * 3)
  full = np.lib.format.open_memmap(out / "image.full.npy", mode="w+", dtype=np.uint8,
                                   shape=(n, r, r, 3))  # [N, R, R, 3]; unwritten rows 0
  rows = {name: [] for name in _row_fields(r, l) if name != "image"}
  rows["expression"] = []
  bad_position, bad_reason = [], []
  proc = SampleProcessor(r, l, tokenizer, None)
  ds = grain.MapDataset.source(src).map(proc).to_iter_dataset(
      grain.ReadOptions(num_threads=max(1, threads), prefetch_buffer_size=_BUILD_PREFETCH))
  bar = tqdm(ds, total=n, desc=f"ready rows {expect['dataset']}:{expect['split']}",
             unit="row", disable=None, mininterval=2.0, leave=False)
  good = 0
  for position, row in enumerate(bar):
    if "bad" in row:
      bad_position.append(position)
      bad_reason.append(BAD_REASONS.index(row["bad"]))
      continue
    pixels = row["pixels"]  # [h, w, 3]
    h, w = pixels.shape[:2]
    full[good, :h, :w] = pixels
    meta = row["meta"]
    rows["content_hw"].append((h, w))
    rows["position"].append(position)
    rows["expression"].append(meta["expression"])
    for name in ("text_ids", "text_mask", "box"):
      rows[name].append(row[name])
    for name in _META_FIELDS:
      rows[name].append(meta[name])
    good += 1
  bar.close()
  counts = {reason: bad_reason.count(i) for i, reason in enumerate(BAD_REASONS)}
  label = f"{expect['dataset']}:{expect['split']}"
  if n - good > max_bad_fraction * n:
    raise DataError(f"{label}: {n - good} of {n} samples are bad ({_reasons(counts)}), more "
                    f"than max_bad_fraction={max_bad_fraction}. Check the dataset "
                    "(`scanformer data inspect`) or raise max_bad_fraction if this is expected.")
  _store_image(full, out, good)
  fields = _row_fields(r, l)
  for name, values in rows.items():
    if name == "expression":
      np.save(out / "expression.npy", np.array(values, np.str_).reshape(good))
    else:
      shape, dtype = fields[name]
      np.save(out / f"{name}.npy", np.asarray(values, dtype).reshape(good, *shape))
  np.save(out / "bad_position.npy", np.asarray(bad_position, np.int64))
  np.save(out / "bad_reason.npy", np.asarray(bad_reason, np.int8))
  seconds = round(time.time() - t0, 1)
  manifest = {**expect, "num_rows": good, "num_samples": n, "bad": counts,
              "build_seconds": seconds,
              "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  (out / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
  if good < n:
    log.warning("%s: %d of %d samples are bad and left out of the ready rows (%s)",
                label, n - good, n, _reasons(counts))
  log.info("%s: %d ready rows at %d px built in %.1f s", label, good, r, seconds)


def _reasons(counts: dict[str, int]) -> str:
  return ", ".join(f"{reason}: {counts[reason]}" for reason in BAD_REASONS)


def _check_disk(out: Path, nbytes: int) -> None:
  free = shutil.disk_usage(out).free
  if nbytes > free:
    raise DataError(f"the ready rows need {nbytes / 2**30:.1f} GiB under {out.parent}, "
                    f"which has {free / 2**30:.1f} GiB free; free space or set "
                    "data.ready_rows=False")


def _store_image(full: np.ndarray, out: Path, good: int) -> None:
  """image.npy: the first `good` rows of the build's image array."""
  full.flush()
  if good == len(full):
    del full
    os.rename(out / "image.full.npy", out / "image.npy")
    return
  image = np.lib.format.open_memmap(out / "image.npy", mode="w+", dtype=np.uint8,
                                    shape=(good, *full.shape[1:]))
  for start in range(0, good, _COPY_CHUNK):
    image[start:start + _COPY_CHUNK] = full[start:min(good, start + _COPY_CHUNK)]
  image.flush()
  del image, full
  os.remove(out / "image.full.npy")


class _TagRow:
  """map_with_index over the repeated shard: the row, its epoch, and whether it opens
  the epoch (that row carries the epoch's build-time skips)."""

  def __init__(self, epoch_len: int):
    self.epoch_len = epoch_len

  def __call__(self, index: int, row: Any) -> dict[str, Any]:
    return {"row": int(row), "epoch": int(index) // self.epoch_len,
            "first": int(index) % self.epoch_len == 0}


class _GatherBatch:
  """A batch of tagged rows -> a contract batch (`collate_uint8`'s), one fancy index
  per field."""

  def __init__(self, arrays: dict[str, np.ndarray], shard_bad: np.ndarray):
    self.arrays = arrays
    self.shard_bad = shard_bad  # [len(BAD_REASONS)] int32

  def __call__(self, picks: dict[str, np.ndarray]) -> dict[str, Any]:
    a, idx = self.arrays, picks["row"]  # [B]
    b = len(idx)
    batch = {name: np.asarray(a[name][idx]) for name in ("image", "text_ids", "text_mask",
                                                         "box")}
    batch["valid"] = np.ones((b,), np.bool_)
    expression = np.empty((b,), np.object_)
    expression[:] = a["expression"][idx].tolist()
    meta = {"expression": expression}
    meta.update({name: np.asarray(a[name][idx]) for name in _META_FIELDS})
    meta["epoch"] = np.asarray(picks["epoch"], np.int32)  # [B]
    skipped = np.zeros((b, len(BAD_REASONS)), np.int32)
    skipped[np.asarray(picks["first"], np.bool_)] = self.shard_bad
    meta["skipped"] = skipped
    meta["skipped_prev"] = np.zeros((b, len(BAD_REASONS)), np.int32)
    batch["meta"] = meta
    batch["content_hw"] = np.asarray(a["content_hw"][idx])  # [B, 2]
    return batch


def train_iter(arrays: dict[str, np.ndarray], *, batch_size: int,
               seed: int, process_index: int, process_count: int, name: str,
               max_bad_fraction: float, tokenizer: Tokenizer | None
               ) -> grain_ops.DataIterator:
  """Endless batches of this process's rows, as `pipeline.make_train_iter` yields them
  (`batch_size` rows per process; the same shard, shuffle and epochs)."""
  position = np.asarray(arrays["position"])  # [N]
  rows = np.flatnonzero(position % process_count == process_index)  # [n]
  if len(rows) < batch_size:
    raise DataError(f"{name} has {len(rows)} usable samples for this process, fewer than "
                    f"one batch of {batch_size}")
  bad_mine = np.asarray(arrays["bad_position"]) % process_count == process_index
  shard_bad = np.bincount(np.asarray(arrays["bad_reason"])[bad_mine],
                          minlength=len(BAD_REASONS)).astype(np.int32)
  ds = grain.MapDataset.source(rows).seed(seed).shuffle().repeat(None)
  ds = ds.map_with_index(_TagRow(len(rows))).batch(batch_size, drop_remainder=True)
  ds = ds.map(_GatherBatch(arrays, shard_bad))
  # One background thread gathers the next batches while the caller trains.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
  stats = bad_input.SkipStats(f"{name} (train)", max_bad_fraction)
  return iter(grain_ops.Account(it, stats, None, tokenizer))
