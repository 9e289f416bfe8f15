"""Device prefetch: global batches assembled and sent in a background thread.

`DevicePrefetch(batches, mesh, depth=2)` wraps a process-local host iterator (numpy
contract batches) and yields global device arrays sharded on the batch axes (with
`steps_per_call=K`, K batches stacked [K, B, ...] for one multi-step call)
(`jax.make_array_from_process_local_data`). A thread keeps `depth` batches in flight,
so the transfer of the next batch overlaps the running step and the host loop never
waits on it.

Checkpointing: the thread runs ahead of the step, so the wrapped iterator's own state
is `depth` batches too far. The wrapper records that state after each batch it takes
and `get_state()` returns the one after the last batch handed out: saved with the
step that consumed it, a resumed run continues with exactly the next batch. Restore
the wrapped iterator first (`set_state` on it), then wrap it; the thread starts on
the first `next`.
"""

from __future__ import annotations

import json
import queue
import threading
from typing import Any, Iterator, Optional, Sequence

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from scanformer_jax import pixels, sharding as sharding_lib

_DONE = object()


def take_host_batches(batches: Iterator[dict], keys: Sequence[str], count: int) -> dict:
  """The next batch of `batches` (its `keys` plus `extra_keys`), or with count > 1 the
  next `count` batches stacked: [count, B_local, ...] per key (a multi-step call)."""
  first = next(batches)
  keys = tuple(keys) + extra_keys(first)
  if count == 1:
    return {k: first[k] for k in keys}
  rest = [next(batches) for _ in range(count - 1)]
  return {k: np.stack([b[k] for b in [first, *rest]]) for k in keys}


def extra_keys(batch: dict) -> tuple[str, ...]:
  """Device keys beyond the contract's that `batch` carries (a uint8 image's content size)."""
  return (pixels.CONTENT_KEY,) if pixels.CONTENT_KEY in batch else ()


class DevicePrefetch:
  """Iterator of device batches (only `keys`, plus `content_hw` when present)."""

  def __init__(self, batches: Iterator[dict], mesh: Mesh, keys: Sequence[str],
               depth: int = 2, steps_per_call: int = 1):
    if depth < 1:
      raise ValueError(f"depth must be >= 1, got {depth}")
    self._batches = batches
    self._mesh = mesh
    self._keys = tuple(keys)
    self._steps_per_call = steps_per_call
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self._state: Any = None  # The wrapped iterator's state after the last batch out.
    self._state_known = False
    self._grain = isinstance(batches, grain.DatasetIterator)

  # ------------------------------------------------------------------- the thread
  def _device_batch(self, host: dict) -> dict:
    return sharding_lib.to_global(host, self._mesh, stacked=self._steps_per_call > 1)

  def _state_of_source(self) -> Any:
    get_state = getattr(self._batches, "get_state", None)
    return get_state() if get_state is not None else None

  def _put(self, item) -> bool:
    """Blocks until there is room; False once stopped."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self) -> None:
    try:
      while not self._stop.is_set():
        try:
          host = take_host_batches(self._batches, self._keys, self._steps_per_call)
        except StopIteration:
          self._put((_DONE, None))
          return
        if not self._put((self._device_batch(host), self._state_of_source())):
          return
    except BaseException as e:  # pylint: disable=broad-except  # Re-raised by `next`.
      self._put((e, None))

  # ------------------------------------------------------------------- the consumer
  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._thread is None:
      self._thread = threading.Thread(target=self._run, name="device-prefetch", daemon=True)
      self._thread.start()
    item, state = self._queue.get()
    if item is _DONE:
      self._queue.put((_DONE, None))  # Every later `next` stops too.
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    self._state, self._state_known = state, True
    return item

  def get_state(self) -> Any:
    """The wrapped iterator's state after the last batch handed out (grain's
    checkpoint handler saves it: JSON bytes for a grain iterator, as its own format)."""
    state = self._state if self._state_known else self._state_of_source()
    if self._thread is not None and not self._state_known:
      raise RuntimeError("get_state before the first batch of a started prefetch")
    if self._grain:
      return json.dumps(state, indent=4).encode()
    return state

  def set_state(self, state: Any) -> None:
    if self._thread is not None:
      raise RuntimeError("restore the wrapped iterator before prefetching from it")
    if self._grain and isinstance(state, (bytes, str)):
      state = json.loads(state)
    self._batches.set_state(state)

  def start_prefetch(self) -> None:
    """grain's checkpoint handler calls this after a restore; the thread starts on `next`."""

  def close(self) -> None:
    """Stops the thread (the batches in flight are dropped)."""
    self._stop.set()
    if self._thread is not None:
      while True:  # Unblock a `put` waiting for room.
        try:
          self._queue.get_nowait()
        except queue.Empty:
          break
      self._thread.join(timeout=10)
      self._thread = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
