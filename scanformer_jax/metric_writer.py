"""Training/eval scalars to `<workdir>/metrics.jsonl` and TensorBoard event files.

Only process 0 writes. TensorBoard event files are written with tensorboardX's
record format (no TensorFlow), in the caller's thread: a full disk or any other
write error is one `UserError` line from `write`, never a traceback from a
background thread or an exit handler.
The JSONL file is appended to, so a resumed run continues the same file; records
from a killed run's unsaved steps may repeat (each record carries its `step`).

Training records use names like `train/loss`, evaluation ones
`eval/<split>/acc_0.5`; per-scale lists become `<name>_s0, <name>_s1, ...`. A metric
has the same name in metrics.jsonl and TensorBoard.

Each record is one `write` call of the whole line. A line torn by a crash or a full
disk (no trailing newline) is cut off when the file is next opened, with a warning,
so the file stays valid JSON lines.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import socket
import time
from typing import Any, Mapping, Optional

import jax

from scanformer_jax.errors import UserError

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
  try:
    value = float(value)
  except (TypeError, ValueError):
    return value
  if value.is_integer() and abs(value) < 2**53:
    return int(value)
  return value if math.isfinite(value) else str(value)


_TAG_INVALID = re.compile(r"[^-/\w.]")


def metric_name(name: str) -> str:
  """The name of a metric in both metrics.jsonl and TensorBoard.

  TensorBoard tags allow letters, digits and `_ - . /` only (tensorboardX would
  rewrite the rest), so `acc@0.5` is written `acc_0.5` in both files.
  """
  return _TAG_INVALID.sub("_", name)


def flatten(scalars: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """`{prefix + name: value}` with one entry per scalar: a list or 1-D array becomes
  `<name>_s0, <name>_s1, ...` (one per scale), a nested dict `<name>/<key>`."""
  out = {}
  for key, value in scalars.items():
    name = prefix + key
    if isinstance(value, Mapping):
      out.update(flatten(value, name + "/"))
    elif isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) == 1:
      out.update({f"{name}_s{i}": v for i, v in enumerate(value)})
    elif getattr(value, "ndim", 0) > 1:
      continue  # Not a scalar series (no such metric today).
    else:
      out[name] = value
  return {metric_name(k): v for k, v in out.items()}


def repair_torn_line(path: str) -> int:
  """Truncates `path` after its last newline; returns the number of bytes cut."""
  if not os.path.exists(path):
    return 0
  with open(path, "rb+") as f:
    size = f.seek(0, os.SEEK_END)
    end = size
    while end > 0:  # Find the last newline, reading backwards in blocks.
      start = max(0, end - 65536)
      f.seek(start)
      block = f.read(end - start)
      at = block.rfind(b"\n")
      if at >= 0:
        end = start + at + 1
        break
      end = start
    if end < size:
      f.truncate(end)
  return size - end


_EVENT_FILE_NUMBERS = itertools.count()


class EventFile:
  """One TensorBoard event file, written synchronously (tensorboardX's record format).

  tensorboardX's SummaryWriter writes from a thread and flushes again at exit, where
  an error (a full disk) can only print tracebacks; here `add_scalar`, `flush` and
  `close` raise OSError to their caller.
  """

  def __init__(self, logdir: str):
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboardX.record_writer import RecordWriter  # pylint: disable=g-import-not-at-top
    os.makedirs(logdir, exist_ok=True)
    name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_EVENT_FILE_NUMBERS)}")
    self._event_pb2 = event_pb2
    self._records = RecordWriter(os.path.join(logdir, name))
    self._add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _add(self, event) -> None:
    self._records.write(event.SerializeToString())

  def add_scalar(self, tag: str, value: float, global_step: int) -> None:
    from tensorboardX.summary import scalar  # pylint: disable=g-import-not-at-top
    self._add(self._event_pb2.Event(wall_time=time.time(), step=int(global_step),
                                    summary=scalar(tag, value)))

  def flush(self) -> None:
    self._records.flush()  # (and fsync)

  def close(self) -> None:
    self._records.close()


class MetricWriter:
  def __init__(self, workdir: str, enabled: Optional[bool] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._tb_dir = os.path.join(workdir, "tensorboard")
    self._jsonl = None
    self._tb = None
    self._failed = False
    if self.enabled:
      try:
        os.makedirs(workdir, exist_ok=True)
        cut = repair_torn_line(self._path)
        if cut:
          log.warning("%s ended in a torn line (%d bytes, from a crash or a full disk); "
                      "cut it off", self._path, cut)
        # Unbuffered: one os-level write per record.
        self._jsonl = open(self._path, "ab", buffering=0)
        self._tb = EventFile(self._tb_dir)
      except OSError as e:
        self.close()
        raise self._error(e.filename or workdir, e) from None

  def _error(self, path: str, error: OSError) -> UserError:
    self._failed = True
    return UserError(f"cannot write {path} ({error.strerror or error}); free space in "
                     f"{os.path.dirname(self._path) or '.'} and rerun the same command "
                     "to resume")

  def _append(self, line: bytes) -> None:
    offset = self._jsonl.tell()
    try:
      written = self._jsonl.write(line)
      if written != len(line):
        raise OSError(f"short write ({written} of {len(line)} bytes)")
    except OSError as e:
      try:  # Leave no partial record behind.
        self._jsonl.truncate(offset)
      except OSError:
        pass  # repair_torn_line cuts it on the next start.
      raise self._error(self._path, e) from None

  def write(self, step: int, scalars: Mapping[str, Any], prefix: str = "") -> None:
    """One record: `step` and every metric, under the same name in both files
    (`prefix` + name, see `flatten` and `metric_name`)."""
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: _plain(v) for k, v in flatten(scalars, prefix).items()})
    self._append((json.dumps(record) + "\n").encode("utf-8"))
    try:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, global_step=int(step))
      self._tb.flush()
    except OSError as e:
      raise self._error(self._tb_dir, e) from None

  def close(self) -> None:
    """Closes both files; an error here is logged (one line), not raised: closing
    runs while another error (often the same full disk) is on its way out."""
    for name, f in (("_jsonl", self._jsonl), ("_tb", self._tb)):
      setattr(self, name, None)
      if f is None:
        continue
      try:
        f.close()
      except OSError as e:
        (log.debug if self._failed else log.warning)(
            "closing %s: %s", self._tb_dir if name == "_tb" else self._path,
            e.strerror or e)
