"""Early-exit criteria: where may the coarse-to-fine scan stop? (an extension point)

A criterion looks at what the model knows after scale s (`ScaleSignals`: the boxes
of scales 0..s, the exit heads' outputs, how much of scale s+1 the selection wants)
and says, per sample, "stop here" (`stop`, [B] bool). The first scale that says so
is the sample's exit scale; the last scale always stops. `stop` is written with
`jax.numpy`, so ONE definition serves both uses:
  - after the fact, on the host (`exit_scale`): sweeps and eval reports apply any
    criterion to one full scan's stored outputs (`scanformer eval --exit-sweep`);
  - inside jit (`exit_scan.ExitScan`): samples that stop skip the finer scales.
A criterion never sees the ground truth, except the `oracle` (`uses_ground_truth`),
the upper bound every criterion is measured against.

Criteria are registered by name and built from strings such as `"iou_head:0.7"`
(`eval.exit_criterion`, `--exit-criteria`). A fork adds one by writing one class in
one file (any imported module) decorated with `@register("name")`; `threshold` is
the number after the colon (a traced scalar inside jit: one compile per criterion,
whatever the threshold). `grid` is the thresholds a sweep tries; `needs` names the
signals beyond the boxes it reads (the exit heads': checked against the config up
front).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from scanformer_jax import box_ops

# Keys of the eval step's per-sample outputs that a criterion may see (no `iou`:
# that needs the ground truth).
MODEL_OUTPUT_KEYS = ("boxes", "taken", "num_dropped", "text_len", "pred_iou", "halt_prob",
                     "box_scale", "wanted_next")
# The signals the exit heads provide: (the head, the ModelConfig switch that adds it).
HEAD_SIGNALS = {"pred_iou": ("the IoU head", "iou_head"),
                "halt_prob": ("the halting head", "halt_head"),
                "box_scale": ("the uncertainty head", "uncertainty_head")}


def model_signals(cfg) -> tuple[str, ...]:
  """The HEAD_SIGNALS keys a model with config `cfg` (a ModelConfig) outputs."""
  return tuple(key for key, (_, switch) in HEAD_SIGNALS.items() if getattr(cfg, switch))


@dataclasses.dataclass(frozen=True)
class ScaleSignals:
  """What the model knows after scale `scale`, per sample (numpy or jax arrays).

  boxes: [B, s+1, 4] cxcywh of scales 0..s; wanted_next: [B] fraction of scale
  s+1's patches the selection wants (0 at the last scale; None where the outputs
  have no such row); pred_iou / halt_prob /
  box_scale: [B, s+1] from the exit heads (None without the head; box_scale is the
  mean predicted Laplace scale of the four coordinates); gt_box: [B, 4], given to
  criteria with `uses_ground_truth` only.
  """
  scale: int
  boxes: object
  wanted_next: object
  pred_iou: Optional[object] = None
  halt_prob: Optional[object] = None
  box_scale: Optional[object] = None
  gt_box: Optional[object] = None


@dataclasses.dataclass(frozen=True)
class ExitCriterion:
  """Base class: a registered name, an optional `threshold`, and `stop`."""
  threshold: Optional[float] = None
  name: ClassVar[str] = ""
  needs: ClassVar[tuple[str, ...]] = ()          # Keys of HEAD_SIGNALS it reads.
  grid: ClassVar[tuple[float, ...]] = ()         # Thresholds a sweep tries.
  uses_ground_truth: ClassVar[bool] = False      # Only the oracle.

  @classmethod
  def from_arg(cls, arg: Optional[str]) -> "ExitCriterion":
    if not cls.grid:
      if arg is not None:
        raise ValueError(f"exit criterion {cls.name} takes no argument, got {arg!r}")
      return cls()
    if arg is None and cls.threshold is not None:  # A default threshold (the oracle's).
      return cls()
    try:
      return cls(float(arg))
    except (TypeError, ValueError):
      raise ValueError(f"exit criterion {cls.name} needs a number, e.g. {cls.name}:"
                       f"{cls.grid[len(cls.grid) // 2]:g}; got {arg!r}") from None

  @property
  def spec(self) -> str:
    return self.name if self.threshold is None else f"{self.name}:{self.threshold:g}"

  def with_threshold(self, threshold) -> "ExitCriterion":
    """This criterion at another threshold (a traced scalar inside jit)."""
    return self if self.threshold is None else dataclasses.replace(self, threshold=threshold)

  def stop(self, signals: ScaleSignals):
    """[B] bool: stop after scale `signals.scale`? (jax.numpy; never called at the last)."""
    raise NotImplementedError

  def exit_scale(self, outputs: Mapping[str, np.ndarray],
                 gt_box: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-sample exit scale [B] int32 from one full scan's outputs (`signals_at`)."""
    num_scales = np.asarray(outputs["boxes"]).shape[1]
    exit_at = np.full(len(outputs["boxes"]), num_scales - 1, np.int32)
    going = np.ones(len(exit_at), bool)
    for s in range(num_scales - 1):
      stop = np.asarray(self.stop(signals_at(outputs, s, gt_box, self)), bool)
      exit_at[going & stop] = s
      going &= ~stop
    return exit_at


def signals_at(outputs: Mapping[str, np.ndarray], s: int,
               gt_box: Optional[np.ndarray] = None,
               criterion: Optional[ExitCriterion] = None) -> ScaleSignals:
  """`ScaleSignals` of scale s from a full scan's per-sample outputs [B, S, ...]
  (the eval step's rows: `boxes`, `wanted_next` and the heads' signals).

  Raises ValueError when `criterion` needs a signal the outputs lack.
  """
  for key in getattr(criterion, "needs", ()):
    if outputs.get(key) is None:
      if key in HEAD_SIGNALS:
        head, switch = HEAD_SIGNALS[key]
        raise ValueError(f"{criterion.name} needs {head}: train the model with "
                         f"model.{switch}=true")
      raise ValueError(f"{criterion.name} needs the {key} output of the eval step")
  if getattr(criterion, "uses_ground_truth", False) and gt_box is None:
    raise ValueError(f"{criterion.name} needs the ground-truth boxes")
  boxes = np.asarray(outputs["boxes"])
  head = lambda key: None if outputs.get(key) is None else np.asarray(outputs[key])[:, :s + 1]  # noqa: E731
  wanted_next = None if outputs.get("wanted_next") is None else np.asarray(
      outputs["wanted_next"])[:, s]
  return ScaleSignals(scale=s, boxes=boxes[:, :s + 1], wanted_next=wanted_next,
                      pred_iou=head("pred_iou"), halt_prob=head("halt_prob"),
                      box_scale=head("box_scale"), gt_box=gt_box)


def head_signals(pred_iou=None, halt_logit=None, box_log_scale=None) -> dict:
  """The exit heads' outputs [B, ...] as criterion signals (jax.numpy, jit or host):
  pred_iou as is, halt_prob = sigmoid(halt_logit), box_scale = mean_c exp(log_scale)."""
  signals = {}
  if pred_iou is not None:
    signals["pred_iou"] = pred_iou
  if halt_logit is not None:
    signals["halt_prob"] = jax.nn.sigmoid(halt_logit)
  if box_log_scale is not None:
    signals["box_scale"] = jnp.exp(box_log_scale).mean(-1)
  return signals


# name -> the criterion class (`cls.from_arg(argument after ":" or None)` builds it).
_REGISTRY: dict[str, type] = {}


def register(name: str):
  """Class decorator: `parse("name[:arg]")` builds `cls.from_arg(arg)`."""
  def add(cls):
    if name in _REGISTRY:
      raise ValueError(f"exit criterion {name!r} is registered twice")
    if issubclass(cls, ExitCriterion):
      cls.name = name
    _REGISTRY[name] = cls
    return cls
  return add


def names() -> list[str]:
  """Registered criterion names, sorted."""
  return sorted(_REGISTRY)


def parse(spec: str):
  """`"iou_head:0.7"` -> `IouHeadThreshold(0.7)`; ValueError names the known criteria."""
  name, sep, arg = spec.strip().partition(":")
  if name not in _REGISTRY:
    raise ValueError(f"unknown exit criterion {name!r}; known: {', '.join(names())}")
  return _REGISTRY[name].from_arg(arg.strip() if sep else None)


def model_outputs(rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The part of per-sample eval rows a criterion may see (drops the true `iou`)."""
  return {k: rows[k] for k in MODEL_OUTPUT_KEYS if k in rows}


def sweep_specs(criteria: Optional[list[str]] = None) -> list[str]:
  """Every registered criterion at every grid threshold (or `criteria` as given)."""
  if criteria:
    return list(criteria)
  specs = []
  for name in names():
    grid = getattr(_REGISTRY[name], "grid", ())
    specs += [f"{name}:{t:g}" for t in grid] or [name]
  return specs


# ------------------------------------------------------------------ the criteria
@register("last_scale")
@dataclasses.dataclass(frozen=True)
class LastScale(ExitCriterion):
  """No early exit: always the finest scale."""

  def stop(self, signals):
    return jnp.zeros(signals.boxes.shape[0], bool)


@register("oracle")
@dataclasses.dataclass(frozen=True)
class Oracle(ExitCriterion):
  """The first scale whose box has IoU >= threshold with the ground truth (default
  0.5): the upper bound, not a usable criterion (it reads the answer)."""
  threshold: Optional[float] = 0.5
  grid: ClassVar[tuple[float, ...]] = (0.5,)
  uses_ground_truth: ClassVar[bool] = True

  def stop(self, signals):
    iou = box_ops.iou_cxcywh(jnp.asarray(signals.boxes[:, -1]), jnp.asarray(signals.gt_box))
    return iou >= self.threshold


@register("iou_head")
@dataclasses.dataclass(frozen=True)
class IouHeadThreshold(ExitCriterion):
  """Stop when the IoU head predicts at least `threshold` for this scale's box."""
  needs: ClassVar[tuple[str, ...]] = ("pred_iou",)
  grid: ClassVar[tuple[float, ...]] = (0.5, 0.6, 0.7, 0.8, 0.9)

  def stop(self, signals):
    return jnp.asarray(signals.pred_iou[:, -1]) >= self.threshold


@register("box_stability")
@dataclasses.dataclass(frozen=True)
class BoxStability(ExitCriterion):
  """Stop when this scale's box overlaps the previous scale's with IoU >= threshold
  (never at scale 0: there is nothing to compare with)."""
  grid: ClassVar[tuple[float, ...]] = (0.7, 0.8, 0.85, 0.9, 0.95)

  def stop(self, signals):
    if signals.scale == 0:
      return jnp.zeros(signals.boxes.shape[0], bool)
    boxes = jnp.asarray(signals.boxes)
    return box_ops.iou_cxcywh(boxes[:, -1], boxes[:, -2]) >= self.threshold


@register("selection_mass")
@dataclasses.dataclass(frozen=True)
class SelectionMass(ExitCriterion):
  """Stop when the scan wants at most `threshold` of the next scale's patches: the
  model itself says there is little left to look at."""
  grid: ClassVar[tuple[float, ...]] = (0.05, 0.1, 0.2, 0.3, 0.4)

  needs: ClassVar[tuple[str, ...]] = ("wanted_next",)

  def stop(self, signals):
    return jnp.asarray(signals.wanted_next) <= self.threshold


@register("halt_head")
@dataclasses.dataclass(frozen=True)
class HaltHead(ExitCriterion):
  """Stop when the halting head's probability that this box is correct (IoU >= 0.5)
  reaches `threshold` (needs model.halt_head)."""
  needs: ClassVar[tuple[str, ...]] = ("halt_prob",)
  grid: ClassVar[tuple[float, ...]] = (0.5, 0.7, 0.8, 0.9, 0.95)

  def stop(self, signals):
    return jnp.asarray(signals.halt_prob[:, -1]) >= self.threshold


@register("box_uncertainty")
@dataclasses.dataclass(frozen=True)
class BoxUncertainty(ExitCriterion):
  """Stop when the predicted Laplace scale of the box coordinates (mean of four, in
  image fractions) is at most `threshold` (needs model.uncertainty_head)."""
  needs: ClassVar[tuple[str, ...]] = ("box_scale",)
  grid: ClassVar[tuple[float, ...]] = (0.01, 0.02, 0.03, 0.05, 0.08)

  def stop(self, signals):
    return jnp.asarray(signals.box_scale[:, -1]) <= self.threshold
