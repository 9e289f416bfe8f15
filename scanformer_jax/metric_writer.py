"""Training/eval scalars to `<workdir>/metrics.jsonl` and TensorBoard event files.

Only process 0 writes. TensorBoard files come from tensorboardX (no TensorFlow).
The JSONL file is appended to, so a resumed run continues the same file; records
from a killed run's unsaved steps may repeat (each record carries its `step`).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional

import jax


def _plain(value: Any) -> Any:
  try:
    value = float(value)
  except (TypeError, ValueError):
    return value
  if value.is_integer() and abs(value) < 2**53:
    return int(value)
  return value if math.isfinite(value) else str(value)


class MetricWriter:
  def __init__(self, workdir: str, enabled: Optional[bool] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, Any], prefix: str = "") -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({prefix + k: _plain(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, global_step=int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._tb.close()
      self._jsonl = self._tb = None
