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

from scanformer_jax import box_ops, exit_heads

# Keys of the eval step's per-sample outputs that a criterion may see besides the exit
# heads' signals (no `iou`: that needs the ground truth).
MODEL_OUTPUT_KEYS = ("boxes", "taken", "num_dropped", "text_len", "wanted_next")


def model_signals(cfg) -> tuple[str, ...]:
  """The exit-head signal keys a model with config `cfg` (a ModelConfig) outputs."""
  return exit_heads.signals(cfg)


@dataclasses.dataclass(frozen=True)
class ScaleSignals:
  """What the model knows after scale `scale`, per sample (numpy or jax arrays).

  boxes: [B, s+1, 4] cxcywh of scales 0..s; wanted_next: [B] fraction of scale
  s+1's patches the selection wants (0 at the last scale; None where the outputs
  have no such row); heads: the exit heads' signals of scales 0..s, [B, s+1] each,
  read as attributes (`signals.halt_prob`; exit_heads.py registers them: pred_iou,
  halt_prob, box_scale = the mean predicted Laplace scale of the four coordinates);
  None when the model lacks the head; gt_box: [B, 4], given to criteria with
  `uses_ground_truth` only.
  """
  scale: int
  boxes: object
  wanted_next: object
  heads: Mapping[str, object] = dataclasses.field(default_factory=dict)
  gt_box: Optional[object] = None

  def __getattr__(self, key: str):
    if key.startswith("__"):
      raise AttributeError(key)
    heads = self.__dict__.get("heads", {})
    if key in heads or exit_heads.providing(key) is not None:
      return heads.get(key)
    raise AttributeError(f"ScaleSignals has no signal {key!r}; exit heads give: "
                         f"{', '.join(sorted(h for h in heads)) or 'none'}")


@dataclasses.dataclass(frozen=True)
class ExitCriterion:
  """Base class: a registered name, an optional `threshold`, and `stop`."""
  threshold: Optional[float] = None
  name: ClassVar[str] = ""
  needs: ClassVar[tuple[str, ...]] = ()          # Signals beyond the boxes it reads.
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
      head = exit_heads.providing(key)
      if head is not None:
        raise ValueError(f"{criterion.name} needs the {head.name!r} exit head "
                         f"({head.description or key}): train the model with "
                         f"model.exit_heads including {head.name!r}")
      raise ValueError(f"{criterion.name} needs the {key} output of the eval step")
  if getattr(criterion, "uses_ground_truth", False) and gt_box is None:
    raise ValueError(f"{criterion.name} needs the ground-truth boxes")
  boxes = np.asarray(outputs["boxes"])
  wanted_next = None if outputs.get("wanted_next") is None else np.asarray(
      outputs["wanted_next"])[:, s]
  heads = {key: np.asarray(outputs[key])[:, :s + 1] for key in signal_keys(outputs)}
  return ScaleSignals(scale=s, boxes=boxes[:, :s + 1], wanted_next=wanted_next, heads=heads,
                      gt_box=gt_box)


def signal_keys(outputs: Mapping[str, object]) -> list[str]:
  """The registered exit-head signals present in `outputs`."""
  return [key for key in outputs
          if outputs.get(key) is not None and exit_heads.providing(key) is not None]


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
  """`"iou_head:0.7"` -> `IouHeadCriterion(0.7)`; ValueError names the known criteria."""
  name, sep, arg = spec.strip().partition(":")
  if name not in _REGISTRY:
    raise ValueError(f"unknown exit criterion {name!r}; known: {', '.join(names())}")
  try:
    return _REGISTRY[name].from_arg(arg.strip() if sep else None)
  except TypeError as e:  # e.g. float(None): a class that needs a threshold and has no grid.
    if sep:
      raise
    raise ValueError(f"exit criterion {name} needs a threshold, e.g. {name}:T (a sweep "
                     f"tries a class's `grid`; this one has none): {e}") from None


def model_outputs(rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The part of per-sample eval rows a criterion may see (drops the true `iou`)."""
  keys = list(MODEL_OUTPUT_KEYS) + signal_keys(rows)
  return {k: rows[k] for k in keys if k in rows}


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
class LastScaleCriterion(ExitCriterion):
  """No early exit: always the finest scale."""

  def stop(self, signals):
    return jnp.zeros(signals.boxes.shape[0], bool)


@register("oracle")
@dataclasses.dataclass(frozen=True)
class OracleCriterion(ExitCriterion):
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
class IouHeadCriterion(ExitCriterion):
  """Stop when the IoU head predicts at least `threshold` for this scale's box."""
  needs: ClassVar[tuple[str, ...]] = ("pred_iou",)
  grid: ClassVar[tuple[float, ...]] = (0.5, 0.6, 0.7, 0.8, 0.9)

  def stop(self, signals):
    return jnp.asarray(signals.pred_iou[:, -1]) >= self.threshold


@register("box_stability")
@dataclasses.dataclass(frozen=True)
class BoxStabilityCriterion(ExitCriterion):
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
class SelectionMassCriterion(ExitCriterion):
  """Stop when the scan wants at most `threshold` of the next scale's patches: the
  model itself says there is little left to look at."""
  grid: ClassVar[tuple[float, ...]] = (0.05, 0.1, 0.2, 0.3, 0.4)

  needs: ClassVar[tuple[str, ...]] = ("wanted_next",)

  def stop(self, signals):
    return jnp.asarray(signals.wanted_next) <= self.threshold


@register("halt_head")
@dataclasses.dataclass(frozen=True)
class HaltHeadCriterion(ExitCriterion):
  """Stop when the halting head's probability that this box is correct (IoU >= 0.5)
  reaches `threshold` (needs the "halt" exit head)."""
  needs: ClassVar[tuple[str, ...]] = ("halt_prob",)
  grid: ClassVar[tuple[float, ...]] = (0.5, 0.7, 0.8, 0.9, 0.95)

  def stop(self, signals):
    return jnp.asarray(signals.halt_prob[:, -1]) >= self.threshold


@register("box_uncertainty")
@dataclasses.dataclass(frozen=True)
class BoxUncertaintyCriterion(ExitCriterion):
  """Stop when the predicted Laplace scale of the box coordinates (mean of four, in
  image fractions) is at most `threshold` (needs the "uncertainty" exit head)."""
  needs: ClassVar[tuple[str, ...]] = ("box_scale",)
  grid: ClassVar[tuple[float, ...]] = (0.01, 0.02, 0.03, 0.05, 0.08)

  def stop(self, signals):
    return jnp.asarray(signals.box_scale[:, -1]) <= self.threshold
