"""Groups queries that arrive together into one batched forward.

Request threads `submit` prepared queries and wait on a future; one worker thread
takes what is queued (up to `max_batch`, waiting at most `max_wait_s` after the
first query for others to join) and runs `predict_queries` once for the group. The
predictor compiles once per batch-size bucket, so groups of any size stay cheap.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent import futures
from typing import Any, Sequence

log = logging.getLogger(__name__)


class Batcher:
  """A worker thread feeding `predictor.predict_queries` with groups of queries."""

  def __init__(self, predictor, max_batch: int, max_wait_s: float = 0.01):
    self.predictor = predictor
    self.max_batch = max(1, max_batch)
    self.max_wait_s = max_wait_s
    self.batch_sizes: list[int] = []  # every group run, for logs and tests
    self._queue: queue.Queue = queue.Queue()
    self._stopped = threading.Event()
    self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
    self._thread.start()

  def submit(self, query: Any) -> futures.Future:
    """The future of one query's `Prediction` (its exception if the forward failed)."""
    if self._stopped.is_set():
      raise RuntimeError("the batcher is stopped")
    future: futures.Future = futures.Future()
    self._queue.put((query, future))
    return future

  def close(self) -> None:
    self._stopped.set()
    self._queue.put(None)
    self._thread.join(timeout=10)

  def _take_group(self) -> list:
    first = self._queue.get()
    if first is None:
      return []
    group = [first]
    deadline = time.monotonic() + self.max_wait_s
    while len(group) < self.max_batch:
      try:
        item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        break
      if item is None:
        self._queue.put(None)  # seen again by the next _take_group: stop then
        break
      group.append(item)
    return group

  def _loop(self) -> None:
    while not self._stopped.is_set():
      group = self._take_group()
      if group:
        self._run(group)

  def _run(self, group: Sequence) -> None:
    queries = [q for q, _ in group]
    self.batch_sizes.append(len(queries))
    try:
      predictions = self.predictor.predict_queries(queries, self.max_batch)
    except Exception as e:  # pylint: disable=broad-except  # answered, not fatal
      log.exception("forward of %d queries failed", len(queries))
      for _, future in group:
        future.set_exception(e)
      return
    for (_, future), prediction in zip(group, predictions):
      future.set_result(prediction)
