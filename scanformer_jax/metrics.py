"""Referring-expression metrics on the host: Acc@0.5 (overall, per scale), mean IoU,
keep ratio per scale, capacity drops; accumulated over batches, padding excluded.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np


class RecMetrics:
  """Accumulates per-sample eval outputs (`eval_step.EvalStep`) of valid rows."""

  def __init__(self, num_patches: Sequence[int], iou_threshold: float = 0.5):
    self.num_patches = np.asarray(num_patches, np.float64)  # [S]
    self.iou_threshold = iou_threshold
    self._rows: dict[str, list[np.ndarray]] = {}

  def add(self, outputs: Mapping[str, np.ndarray]) -> None:
    valid = np.asarray(outputs["valid"], bool)
    for key, value in outputs.items():
      if key != "valid":
        self._rows.setdefault(key, []).append(np.asarray(value)[valid])

  def arrays(self) -> dict[str, np.ndarray]:
    """Concatenated per-sample arrays of every valid row seen so far."""
    return {k: np.concatenate(v) for k, v in self._rows.items()}

  @property
  def count(self) -> int:
    return int(sum(len(v) for v in self._rows.get("iou", [])))

  def result(self, exit_scale: Optional[np.ndarray] = None) -> dict[str, Any]:
    """Metrics of the final scale (or, with `exit_scale [N]`, of each sample's exit)."""
    rows = self.arrays()
    if not rows:
      return {"count": 0}
    iou = rows["iou"]  # [N, S]
    hits = iou >= self.iou_threshold  # [N, S]
    final = iou.shape[1] - 1 if exit_scale is None else exit_scale
    final_iou = iou[np.arange(len(iou)), final]
    return {
        "acc@0.5": float(np.mean(final_iou >= self.iou_threshold)),
        "acc@0.5_per_scale": hits.mean(0).tolist(),
        "mean_iou": float(final_iou.mean()),
        "keep_ratio": (rows["taken"].mean(0) / self.num_patches).tolist(),
        "num_dropped": float(rows["num_dropped"].sum(1).mean()),
        "count": int(len(iou)),
    }
