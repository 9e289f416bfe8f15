"""grain plumbing: epoch tags, skipping bad rows, counting, worker processes, eval
shards. The per-sample work is in `processing`; `pipeline` assembles the two."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from typing import Any, Sequence

import grain

from data_pipelines import bad_input
from data_pipelines.contract import BAD_REASONS
from data_pipelines.errors import DataError
from data_pipelines.tokenizer import Tokenizer

# How often a worker checks that its parent is alive (`exit_with_parent`).
PARENT_POLL_S = 0.5


def default_num_workers() -> int:
  """Worker processes: none on small machines (threads suffice), else a few."""
  cpus = os.cpu_count() or 1
  return 0 if cpus <= 4 else min(8, cpus // 2)


def default_read_threads() -> int:
  return max(2, min(8, os.cpu_count() or 1))


class TagEpoch:
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


class SkipBad(grain.IterDataset):
  """Training: bad rows dropped, counted on the next good row."""

  def __init__(self, parent: grain.IterDataset):
    super().__init__(parent)

  def __iter__(self) -> _SkipBadIterator:
    return _SkipBadIterator(self._parent.__iter__())


_PIPELINE, _COUNTS = "pipeline", "skip_stats"  # The keys of `DataIterator.get_state`.


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
    """The pipeline's position and the epoch's counts so far (`SkipStats.state`)."""
    return {_PIPELINE: self._parent.get_state(), _COUNTS: self.stats.state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if _PIPELINE in state and _COUNTS in state:
      self._parent.set_state(state[_PIPELINE])
      self.stats.set_state(state[_COUNTS])
    else:  # Saved before the counts were: the position only.
      self._parent.set_state(state)


class Account(grain.IterDataset):
  """The outermost dataset: its iterator is the `DataIterator`."""

  def __init__(self, parent: grain.IterDataset, stats, num_batches, tokenizer):
    super().__init__(parent)
    self._args = (stats, num_batches, tokenizer)

  def __iter__(self) -> DataIterator:
    return DataIterator(self._parent.__iter__(), *self._args)


def exit_with_parent(worker_index: int, worker_count: int) -> None:
  """grain `worker_init_fn`: the worker exits as soon as its parent process is gone.

  grain 0.2.18's workers (spawned processes) stop only on an event the parent sets;
  after `kill -9` of the parent they block forever on their full output queue, and
  keep multiprocessing's resource tracker alive too. A daemon thread polls
  `os.getppid()` (it changes when the orphan is re-parented) and ends the worker.
  The parent's pid comes from multiprocessing (recorded when the worker was created),
  so a parent that died while the worker was still starting is noticed too.
  Not `prctl(PR_SET_PDEATHSIG)`: that fires when the parent *thread* that spawned the
  worker ends, and grain spawns workers from a short-lived thread pool.
  """
  del worker_index, worker_count
  parent_process = multiprocessing.parent_process()
  parent = parent_process.pid if parent_process is not None else os.getppid()

  def watch() -> None:
    while os.getppid() == parent:
      time.sleep(PARENT_POLL_S)
    os._exit(1)  # pylint: disable=protected-access

  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def mp_prefetch(it: grain.IterDataset, workers: int, buffer: int) -> grain.IterDataset:
  """grain worker processes that exit with their parent. grain reads absl flags
  there; programs that do not use absl (ours use argparse) never parse them, so mark
  them parsed (defaults)."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=buffer),
                        worker_init_fn=exit_with_parent)


def per_process_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise DataError(f"global_batch_size {global_batch_size} is not divisible by "
                    f"process_count {process_count}")
  return global_batch_size // process_count


class EvalSource:
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
