"""Early exit: pick, per sample, the scale whose box is the answer (an extension point).

The sparse scan computes every scale; an exit criterion decides after the fact where
the model *could* have stopped, so evaluation can report accuracy and GFLOPs at exit.
A criterion sees per-sample, per-scale host arrays (`boxes [B, S, 4]`, `pred_iou
[B, S]` when the model has the IoU head) and returns the exit scale `[B]`. Add a
criterion by implementing `ExitCriterion`; nothing else changes.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Protocol

import numpy as np


class ExitCriterion(Protocol):
  name: str

  def exit_scale(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per-sample scale index in [0, S) at which the scan stops: [B] int."""


@dataclasses.dataclass(frozen=True)
class LastScale:
  """No early exit: always the finest scale."""
  name: str = "last_scale"

  def exit_scale(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    b, s = outputs["boxes"].shape[:2]
    return np.full((b,), s - 1, np.int32)


@dataclasses.dataclass(frozen=True)
class IouHeadThreshold:
  """Stop at the first scale whose predicted IoU reaches `threshold` (else the last)."""
  threshold: float
  name: str = "iou_head"

  def exit_scale(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    pred = outputs.get("pred_iou")
    if pred is None:
      raise ValueError("IouHeadThreshold needs a model with the IoU head (model.iou_head)")
    confident = np.asarray(pred) >= self.threshold  # [B, S]
    confident[:, -1] = True
    return np.argmax(confident, axis=1).astype(np.int32)


def select_at_exit(per_scale: np.ndarray, exit_scale: np.ndarray) -> np.ndarray:
  """`per_scale [B, S, ...]` -> the entries at each sample's exit scale `[B, ...]`."""
  return per_scale[np.arange(per_scale.shape[0]), exit_scale]
