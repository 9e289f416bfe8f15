"""Exit thresholds with a guarantee: chosen on one split, checked on another.

`scanformer eval --workdir W --exit-calibrate --split validation --risk EPS --delta
DELTA [--guarantee high-probability|expectation] [--loss acc_drop|iou_drop]
[--exit-criteria ...] [--report-split test]` runs the full scan once over the
calibration split and, for every criterion with a threshold, computes each sample's
loss (`risk_control.exit_losses`: what stopping at the criterion's exit scale costs
against the last scale) at every threshold of its calibration grid, ordered from the
safest threshold to the most aggressive (`ordered_grid`, fixed before any data is
seen). `risk_control.choose` then picks the most aggressive threshold whose risk is
at most EPS, with probability >= 1 - DELTA over the draw of the calibration split
(Learn-then-Test) or in expectation (conformal risk control). A criterion with no
such threshold falls back to no exit, with a message naming the safest threshold's
risk. Writes W/exit_calibration.json; `--exit-criterion calibrated:<name>` (the
`calibrated` criterion, registered here) runs the chosen threshold.

The guarantee holds for new samples exchangeable with the calibration split (drawn
from the same distribution); it says nothing about a shifted one. Held out
(`report`): the chosen thresholds' realised risk on another split, with its exact
binomial interval, and their GFLOPs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import numpy as np

from scanformer_jax import early_exit, evaluate, exit_heads, risk_control, timing
from scanformer_jax.errors import UserError

FILENAME = "exit_calibration.json"
# Calibration grids of the built-in criteria: finer and wider than their sweep grids
# (fixed-sequence testing pays nothing for more thresholds, and a strict risk needs
# thresholds safer than a sweep's). Other criteria use their `grid`.
CALIBRATION_GRIDS = {
    "halt_head": (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97, 0.98, 0.99,
                  0.995, 0.999),
    "iou_head": (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99),
    "box_stability": (0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97, 0.98, 0.99, 0.995),
    "selection_mass": (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4),
    "box_uncertainty": (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.08),
}
# Not calibrated: no threshold, the answer itself, or this module's own.
REFERENCE_CRITERIA = ("last_scale", "oracle", "calibrated")


def path(workdir: str) -> str:
  return os.path.join(workdir, FILENAME)


def _probe_outputs(num_scales: int, count: int = 512) -> dict[str, np.ndarray]:
  """Fixed synthetic full-scan outputs spanning every signal's range (no data): how a
  criterion's exits move with its threshold."""
  rng = np.random.default_rng(0)
  centre = rng.uniform(0.3, 0.7, (count, 1, 2))
  size = rng.uniform(0.1, 0.4, (count, 1, 2))
  jitter = rng.uniform(0, 0.3, (count, 1, 1)) * rng.normal(size=(count, num_scales, 4))
  boxes = np.concatenate([np.broadcast_to(centre, (count, num_scales, 2)),
                          np.broadcast_to(size, (count, num_scales, 2))], -1) + jitter
  boxes[..., 2:] = np.abs(boxes[..., 2:]) + 0.01
  # Every registered exit head's signal (a plugin's too) in [0, 1]; the built-in box
  # scale in its own range.
  signals = {exit_heads.get(name).signal: rng.uniform(0, 1, (count, num_scales))
             for name in exit_heads.names()}
  signals["box_scale"] = rng.uniform(0, 0.12, (count, num_scales))
  return {**{k: v.astype(np.float32) for k, v in signals.items()},
          "boxes": boxes.astype(np.float32),
          "wanted_next": rng.uniform(0, 0.6, (count, num_scales)).astype(np.float32),
          "taken": np.ones((count, num_scales), np.int32),
          "num_dropped": np.zeros((count, num_scales), np.int32),
          "text_len": np.full((count,), 4, np.int32)}


def ordered_grid(name: str, grid: Optional[Sequence[float]] = None,
                 num_scales: int = 3) -> list[float]:
  """`name`'s calibration grid (or `grid`), safest threshold first: the direction in
  which its exits come later, found on fixed synthetic outputs (`_probe_outputs`), so
  the order never depends on the calibration data."""
  values = sorted(set(float(t) for t in (grid or CALIBRATION_GRIDS.get(name) or getattr(
      early_exit.parse(f"{name}:0.5").__class__, "grid", ()))))
  if len(values) < 2:
    return values
  probe = _probe_outputs(max(num_scales, 3))  # The direction is the criterion's, not the model's.
  mean_exit = [float(early_exit.parse(f"{name}:{t!r}").exit_scale(probe).mean())
               for t in (values[0], values[-1])]
  if mean_exit[0] == mean_exit[1]:
    raise UserError(f"cannot tell which way {name}'s threshold is safer: its exits do not "
                    "move with the threshold on varied outputs")
  return values if mean_exit[0] > mean_exit[1] else values[::-1]


def calibratable(cfg, criteria: Optional[Sequence[str]] = None) -> dict[str, list[float]]:
  """{criterion name: its grid safest first} to calibrate on a model with config `cfg`:
  `criteria` as names (their calibration grid) or `name:threshold` specs (those
  thresholds), default every registered threshold criterion this model can run."""
  if criteria:
    grids: dict[str, list[float]] = {}
    for spec in criteria:
      name, _, arg = spec.partition(":")
      if name in REFERENCE_CRITERIA:
        raise UserError(f"--exit-calibrate calibrates threshold criteria; {name} has none "
                        "to choose")
      evaluate.parse_criterion(f"{name}:{arg or 0.5}", cfg)  # Runs on this model?
      grids.setdefault(name, [])
      if arg:
        grids[name].append(float(arg))
    return {name: ordered_grid(name, grid or None, cfg.num_scales)
            for name, grid in grids.items()}
  out = {}
  for name in early_exit.names():
    if name in REFERENCE_CRITERIA:
      continue
    try:
      criterion = evaluate.parse_criterion(f"{name}:0.5", cfg)
    except UserError:
      continue  # This model lacks the signal (the sweep lists why).
    if getattr(criterion, "uses_ground_truth", False) or getattr(criterion, "threshold",
                                                                  None) is None:
      continue
    out[name] = ordered_grid(name, None, cfg.num_scales)
  return out


def _losses(metrics, name: str, grid: Sequence[float], loss: str, margin: float,
            iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
  """(losses [N, K], exit scales [N, K]) of `name` at each threshold of `grid`."""
  iou = metrics.arrays()["iou"]  # [N, S]
  exits = np.stack([evaluate.exit_scales(metrics, early_exit.parse(f"{name}:{t!r}"))
                    for t in grid], axis=1)  # [N, K]
  losses = risk_control.exit_losses(iou[:, None, :].repeat(len(grid), 1), exits, loss,
                                    iou_threshold, margin)  # [N, K]
  return losses, exits


def calibrate(cfg, metrics, split: str, grids: dict[str, list[float]], eps: float,
              delta: float, guarantee: str = "high-probability", loss: str = "acc_drop",
              margin: float = 0.1, p_value: str = "hb") -> dict:
  """The calibration (JSON-able; module docstring) of every criterion in `grids` on the
  full-scan rows `metrics` of `split`."""
  if not 0 < eps < 1 or not 0 < delta < 1:
    raise UserError(f"--risk {eps} and --delta {delta} must lie in (0, 1)")
  n = metrics.count
  out = {"split": split, "chosen_on": split, "count": n, "eps": eps, "delta": delta,
         "guarantee": guarantee, "loss": loss, "margin": margin if loss == "iou_drop" else None,
         "p_value": p_value if guarantee == "high-probability" else None,
         "iou_threshold": metrics.iou_threshold, "criteria": {}}
  bound = (f"{loss} <= {eps:g}" + (f" at delta {delta:g}" if guarantee == "high-probability"
                                   else " in expectation"))
  for name, grid in grids.items():
    losses, _ = _losses(metrics, name, grid, loss, margin, metrics.iou_threshold)
    chosen = risk_control.choose(losses, eps, delta, guarantee, p_value)
    index = int(chosen["index"])
    entry = {"grid_safest_first": list(grid), "risk_hat": chosen["risk_hat"].tolist()}
    entry.update({k: chosen[k].tolist() for k in ("p_values", "bound") if k in chosen})
    if index < 0:
      safest = float(chosen["risk_hat"][0])
      entry.update(threshold=None, spec="last_scale", message=(
          f"no threshold of {name} meets {bound} on {n} samples; the safest "
          f"({name}:{grid[0]:g}) has {safest:.3g}: no exit"))
      need = risk_control.min_samples(eps, delta, guarantee)
      if need and n < need:
        entry["message"] += f" (even a zero loss needs {need} samples)"
    else:
      threshold = grid[index]
      spec = f"{name}:{threshold!r}"
      exit_scale = evaluate.exit_scales(metrics, early_exit.parse(spec))
      entry.update(threshold=threshold, spec=spec,
                   risk_hat_at_threshold=float(chosen["risk_hat"][index]),
                   **_exit_facts(cfg, metrics, exit_scale))
    out["criteria"][name] = entry
  return out


def _exit_facts(cfg, metrics, exit_scale: np.ndarray) -> dict:
  rows = metrics.arrays()
  return {"mean_exit_scale": float(exit_scale.mean()),
          "exit_histogram": np.bincount(exit_scale, minlength=cfg.num_scales).tolist(),
          "acc@0.5": metrics.result(exit_scale)["acc@0.5"],
          "gflops": evaluate.gflops_at_exit(cfg, rows["taken"], rows["text_len"], exit_scale)}


def report(cfg, metrics, split: str, calibration: dict, alpha: float = 0.05) -> dict:
  """Each chosen threshold on the held-out rows `metrics` of `split`: the realised risk
  with its exact (1 - alpha) binomial interval, Acc@0.5 and GFLOPs, beside no exit."""
  iou = metrics.arrays()["iou"]  # [N, S]
  no_exit = np.full(len(iou), iou.shape[1] - 1)
  base = _exit_facts(cfg, metrics, no_exit)
  out = {"split": split, "count": metrics.count, "no_exit": base, "criteria": {}}
  for name, entry in calibration["criteria"].items():
    exit_scale = evaluate.exit_scales(metrics, early_exit.parse(entry["spec"]))
    losses = risk_control.exit_losses(iou, exit_scale, calibration["loss"],
                                      calibration["iou_threshold"],
                                      calibration.get("margin") or 0.0)
    facts = _exit_facts(cfg, metrics, exit_scale)
    out["criteria"][name] = {
        "spec": entry["spec"], **facts,
        "realised_risk": risk_control.realised_risk(losses, alpha),
        "gflops_saved": 1 - facts["gflops"] / base["gflops"],
        "gflops_ratio": base["gflops"] / facts["gflops"]}
  return out


def write(calibration: dict, workdir: str) -> str:
  """W/exit_calibration.json (atomically); returns its path."""
  out = path(workdir)
  with open(out + ".partial", "w") as f:
    json.dump(calibration, f, indent=2, allow_nan=False)
    f.write("\n")
  os.replace(out + ".partial", out)
  return out


def format_calibration(result: dict) -> str:
  """The chosen thresholds and, when reported, their held-out risk and speed."""
  g = ("with probability >= {:g}".format(1 - result["delta"])
       if result["guarantee"] == "high-probability" else "in expectation")
  lines = [f"exit calibration on {result['split']} ({result['count']} samples): "
           f"{result['loss']} <= {result['eps']:g} {g}"]
  held = result.get("report")
  if held:
    lines.append(f"reported on {held['split']} ({held['count']} samples; no exit: acc "
                 f"{held['no_exit']['acc@0.5']:.4f}, {held['no_exit']['gflops']:.4f} GFLOPs)")
  for name, entry in result["criteria"].items():
    if entry["threshold"] is None:
      lines.append(f"  {name}: {entry['message']}")
      continue
    text = (f"  {name}: {entry['spec']} (calibration risk {entry['risk_hat_at_threshold']:.4f}, "
            f"mean exit scale {entry['mean_exit_scale']:.2f})")
    if held:
      r = held["criteria"][name]
      risk = r["realised_risk"]
      lo, hi = risk["interval"]
      text += (f"; on {held['split']}: risk {risk['risk']:.4f} ({risk['losses']}/"
               f"{risk['count']}, {risk['interval_level']:.0%} CI {lo:.4f}-{hi:.4f}), acc "
               f"{r['acc@0.5']:.4f}, GFLOPs saved {r['gflops_saved']:.1%}")
      if "speedup_spread" in r:
        text += (f", speedup {timing.format_spread(r['speedup_spread'])} (median of paired "
                 f"ratios) = {r['realised']:.2f} of the GFLOPs saving")
    lines.append(text)
  overhead = (held or {}).get("no_exit_over_plain")
  if overhead:
    lines.append(f"exit path at no exit over the plain sparse eval on {held['split']}: "
                 f"{timing.format_spread(overhead)} (median of paired ratios; < 1: the exit "
                 "machinery costs)")
  return "\n".join(lines)


# ------------------------------------------------------------------ the criterion
_ACTIVE: dict[str, Any] = {}


def activate(workdir: str) -> Optional[dict]:
  """Makes W/exit_calibration.json's thresholds the `calibrated:<name>` criteria (None
  when W has none)."""
  _ACTIVE.clear()
  file = path(workdir)
  if not os.path.isfile(file):
    return None
  with open(file) as f:
    _ACTIVE.update(json.load(f), file=file)
  return dict(_ACTIVE)


def deactivate() -> None:
  _ACTIVE.clear()


@early_exit.register("calibrated")
@dataclasses.dataclass(frozen=True)
class CalibratedCriterion:
  """`calibrated:<name>`: criterion <name> at the threshold `--exit-calibrate` chose
  for this workdir (no exit when none met the bound). Parsing returns that criterion
  itself, so the exit path and reports run it as any other."""
  name = "calibrated"

  @classmethod
  def from_arg(cls, arg: Optional[str]):
    if not arg:
      raise ValueError("calibrated needs a criterion name, e.g. calibrated:halt_head")
    if not _ACTIVE:
      raise ValueError(f"calibrated:{arg} needs the workdir's {FILENAME}: run `scanformer "
                       "eval --workdir W --exit-calibrate --split validation` first")
    entry = _ACTIVE["criteria"].get(arg)
    if entry is None:
      raise ValueError(f"{_ACTIVE['file']} has no {arg}; calibrated: "
                       f"{', '.join(_ACTIVE['criteria']) or 'none'}")
    return early_exit.parse(entry["spec"])
