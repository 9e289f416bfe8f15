"""Early exit: pick, per sample, the scale whose box is the answer (an extension point).

The sparse scan computes every scale; an exit criterion decides after the fact where
the model *could* have stopped, so evaluation can report accuracy and GFLOPs at exit.
A criterion sees only what the model knows at each scale: per-sample, per-scale host
arrays of model outputs (`boxes [B, S, 4]`, `taken [B, S]`, `num_dropped [B, S]`,
`text_len [B]`, `pred_iou [B, S]` when the model has the IoU head), never the
ground-truth IoU, and returns the exit scale `[B]`.

Criteria are registered by name and built from strings such as `"iou_head:0.7"` or
`"last_scale"` (`eval.exit_criterion`, the sweep's `--criteria`). A new criterion is
one class here (or in any imported module) decorated with `@register("name")`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Protocol

import numpy as np

# Keys of the eval step's per-sample outputs that a criterion may see (no `iou`:
# that needs the ground truth).
MODEL_OUTPUT_KEYS = ("boxes", "taken", "num_dropped", "text_len", "pred_iou")


class ExitCriterion(Protocol):
  name: str

  def exit_scale(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per-sample scale index in [0, S) at which the scan stops: [B] int."""


# name -> factory(argument after ":" or None) -> criterion.
_REGISTRY: dict[str, Callable[[Optional[str]], ExitCriterion]] = {}


def register(name: str):
  """Class decorator: `parse("name[:arg]")` builds `cls.from_arg(arg)`."""
  def add(cls):
    if name in _REGISTRY:
      raise ValueError(f"exit criterion {name!r} is registered twice")
    _REGISTRY[name] = cls.from_arg
    return cls
  return add


def names() -> list[str]:
  """Registered criterion names, sorted."""
  return sorted(_REGISTRY)


def parse(spec: str) -> ExitCriterion:
  """`"iou_head:0.7"` -> `IouHeadThreshold(0.7)`; ValueError names the known criteria."""
  name, sep, arg = spec.strip().partition(":")
  if name not in _REGISTRY:
    raise ValueError(f"unknown exit criterion {name!r}; known: {', '.join(names())}")
  return _REGISTRY[name](arg.strip() if sep else None)


def model_outputs(rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The part of per-sample eval rows a criterion may see (drops the true `iou`)."""
  return {k: rows[k] for k in MODEL_OUTPUT_KEYS if k in rows}


def _float_arg(name: str, arg: Optional[str]) -> float:
  try:
    return float(arg)
  except (TypeError, ValueError):
    raise ValueError(f"exit criterion {name} needs a number, e.g. {name}:0.7; "
                     f"got {arg!r}") from None


@register("last_scale")
@dataclasses.dataclass(frozen=True)
class LastScale:
  """No early exit: always the finest scale."""
  name: str = "last_scale"

  @classmethod
  def from_arg(cls, arg: Optional[str]) -> "LastScale":
    if arg is not None:
      raise ValueError(f"exit criterion last_scale takes no argument, got {arg!r}")
    return cls()

  @property
  def spec(self) -> str:
    return self.name

  def exit_scale(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    b, s = outputs["boxes"].shape[:2]
    return np.full((b,), s - 1, np.int32)


@register("iou_head")
@dataclasses.dataclass(frozen=True)
class IouHeadThreshold:
  """Stop at the first scale whose predicted IoU reaches `threshold` (else the last)."""
  threshold: float
  name: str = "iou_head"

  @classmethod
  def from_arg(cls, arg: Optional[str]) -> "IouHeadThreshold":
    return cls(_float_arg("iou_head", arg))

  @property
  def spec(self) -> str:
    return f"{self.name}:{self.threshold:g}"

  def exit_scale(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    pred = outputs.get("pred_iou")
    if pred is None:
      raise ValueError("IouHeadThreshold needs a model with the IoU head (model.iou_head)")
    confident = np.asarray(pred) >= self.threshold  # [B, S]
    confident[:, -1] = True
    return np.argmax(confident, axis=1).astype(np.int32)
