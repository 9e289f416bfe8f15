"""Early-exit curves: every criterion over its threshold grid, chosen on one split.

`scanformer eval --exit-sweep DIR [--report-split S]` runs the sparse evaluation ONCE
per split, applies every criterion (`early_exit.py`, each at every threshold of its
`grid`, or the specs given) to the stored per-sample outputs, and reports per point:
Acc@0.5, mean IoU, mean exit scale, the exit-scale histogram and the analytic GFLOPs
per sample of the patches read up to the exit (`evaluate.gflops_at_exit`). The
operating points (per criterion, the fewest GFLOPs within `ACC_TOLERANCE` of no exit)
are chosen on `--split` and reported on `--report-split` (held out; the JSON's
`chosen_on` / `reported_on` and the plot's title say which). The evaluation streams
the split (one batch on the device at a time). With `measure` it then runs the real
exit path (`exit_scan.ExitScan`: ONE compiled program for every criterion and
threshold, both arguments) over the reporting split's first `evaluate.TIMED_BATCHES`
batches, kept on the device, and adds the measured samples/s (`timing.py`: the
fastest of a few passes; the operating points and the no-exit point in alternating
passes beside their baseline, a median of paired ratios with its spread), the forced
(overflow) exits and whether its exit scales agree with the after-the-fact ones on
those samples (`checked_samples`). Writes DIR/exit_sweep.json and DIR/exit_sweep.png
(accuracy vs GFLOPs and vs measured speedup; one line per criterion, the oracle and
the no-exit point marked, the operating points ringed).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from scanformer_jax import data_source, early_exit, evaluate, sharding as sharding_lib, timing
from scanformer_jax.config import ExperimentConfig
from scanformer_jax.errors import UserError
from scanformer_jax.eval_step import EvalStep
from scanformer_jax.exit_scan import ExitScan

# An operating point keeps Acc@0.5 within this of the no-exit scan.
ACC_TOLERANCE = 0.01
# Timed passes of each operating point, each beside a pass of the no-exit path.
PAIRED_PASSES = 7


def usable_specs(config: ExperimentConfig, specs: Optional[Sequence[str]]
                 ) -> tuple[list[str], dict[str, str]]:
  """(specs this model can run, {skipped criterion: why}). Given specs must all run."""
  chosen, skipped = [], {}
  for spec in early_exit.sweep_specs(list(specs) if specs else None):
    if not specs and spec.split(":")[0] == "calibrated":
      continue  # A calibrated threshold is one of the grid's: `--exit-calibrate`.
    try:
      evaluate.parse_criterion(spec, config.model)
      chosen.append(spec)
    except UserError as e:
      if specs:
        raise
      skipped.setdefault(spec.split(":")[0], str(e))
  for needed in ("last_scale", "oracle"):  # The two reference points, always.
    if not any(spec.split(":")[0] == needed for spec in chosen):
      chosen.append(needed)
  return chosen, skipped


def measure_exit_path(config: ExperimentConfig, params: Any, mesh: Mesh, shardings: Any,
                      device_batches: list[dict], specs: Sequence[str], metrics: Any,
                      paired: Sequence[str] = (), passes: int = 2,
                      progress: bool = True) -> tuple[dict[str, dict], float]:
  """({spec: measured facts} of the real exit path, plain sparse eval samples/s), both
  timed over `device_batches` (the first batches of the split `metrics` holds,
  `evaluate.first_device_batches`): one compiled program for every criterion and
  threshold (compiled before timing), the fastest of `passes` passes
  (`timing.best_pass`). The `paired` specs (the operating points) are timed
  `PAIRED_PASSES` times, each pass beside a pass of the no-exit path (`last_scale`):
  `paired_speedup` is the median of the per-pair ratios with its spread
  (`timing.paired_ratios`), a speedup from timings seconds apart, not minutes (on a
  shared host the speed drifts by tens of percent over a sweep). The no-exit point
  itself is paired with the plain sparse eval the same way (`paired_over_plain`: the
  exit machinery's cost when nothing exits).
  """
  cfg = config.model
  count = sum(int(np.asarray(sharding_lib.fetch(b["valid"])).sum()) for b in device_batches)
  plain = EvalStep(cfg, mesh, shardings)
  run_plain = lambda: [plain(params, b) for b in device_batches]  # noqa: E731
  seconds, _ = timing.best_pass(run_plain, passes)
  plain_samples_per_s = count / max(seconds, 1e-9)
  criteria = {}
  for spec in specs:
    criterion = early_exit.parse(spec)
    criteria.setdefault(criterion.name, criterion)
  program = ExitScan(cfg, mesh, shardings, list(criteria.values()),
                     config.eval.exit_sub_batches)
  jax.block_until_ready(program(params, device_batches[0]))  # Compile once.
  no_exit = early_exit.parse("last_scale")
  run = lambda c: [program(params, b, c.threshold, c.name) for b in device_batches]  # noqa: E731
  facts = {}
  bar = tqdm(specs, desc="exit path", unit="point", disable=not progress, leave=False)
  for spec in bar:
    criterion = early_exit.parse(spec)
    extra = {}
    if spec in paired or criterion == no_exit:  # Alternate: drift hits both alike.
      base_name = "plain" if criterion == no_exit else "no_exit"
      base_run = run_plain if criterion == no_exit else lambda: run(no_exit)
      times, last = timing.alternating_passes(
          {base_name: base_run, "point": lambda c=criterion: run(c)}, PAIRED_PASSES)
      outs, seconds = last["point"], min(times["point"])
      ratios = timing.paired_ratios(times[base_name], times["point"])
      if criterion == no_exit:
        extra = {"paired_over_plain": ratios, "paired_plain_samples_per_s": float(
            count / max(min(times["plain"]), 1e-9))}
      else:
        extra = {"paired_speedup": ratios, "paired_no_exit_samples_per_s": float(
            count / max(min(times["no_exit"]), 1e-9))}
    else:
      seconds, outs = timing.best_pass(lambda c=criterion: run(c), passes)
    outs = [sharding_lib.fetch(o) for o in outs]
    rows = {k: np.concatenate([o[k][np.asarray(o["valid"], bool)] for o in outs])
            for k in ("exit_scale", "forced", "answer_iou")}
    expected = evaluate.exit_scales(metrics, criterion)[:len(rows["exit_scale"])]
    facts[spec] = {
        "checked_samples": int(len(rows["exit_scale"])),
        "samples_per_s": float(count / max(seconds, 1e-9)), **extra,
        "forced_exits": int(rows["forced"].sum()),
        "exit_scale_agreement": float(np.mean(rows["exit_scale"] == expected)),
        "acc@0.5_exit_path": float(np.mean(rows["answer_iou"] >= config.eval.iou_threshold)),
        "mean_rows_run": np.mean([o["rows_run"].mean(0) for o in outs], axis=0).tolist(),
    }
  return facts, plain_samples_per_s


def _cheapest_points(no_exit: dict, criteria: dict[str, list]) -> dict[str, dict]:
  """Per criterion (not the references): its fewest-GFLOPs point whose Acc@0.5 is
  within ACC_TOLERANCE of the no-exit scan's."""
  out = {}
  for name, points in criteria.items():
    good = [p for p in points if p["acc@0.5"] >= no_exit["acc@0.5"] - ACC_TOLERANCE]
    if good and name not in ("last_scale", "oracle"):
      out[name] = min(good, key=lambda p: p["gflops"])
  return out


def speed_entry(point: dict, no_exit: dict, gflops_ratio: float) -> dict:
  """The measured speed of a timed `point` over the no-exit path: `speedup` is the
  median of the paired ratios (`paired_speedup`, with its spread) when it was timed
  so, else the ratio of the fastest passes; `realised` = speedup / GFLOPs ratio."""
  if "samples_per_s" not in point or "samples_per_s" not in no_exit:
    return {}
  entry = {"samples_per_s": point["samples_per_s"],
           "no_exit_samples_per_s": point.get("paired_no_exit_samples_per_s",
                                              no_exit["samples_per_s"])}
  if "paired_speedup" in point:
    entry["speedup_spread"] = point["paired_speedup"]
    entry["speedup"] = point["paired_speedup"]["median"]
    entry["speedup_statistic"] = "median of paired ratios"
  else:
    entry["speedup"] = entry["samples_per_s"] / entry["no_exit_samples_per_s"]
    entry["speedup_statistic"] = "ratio of fastest passes"
  entry["realised"] = entry["speedup"] / gflops_ratio
  return entry


def operating_points(result: dict) -> dict[str, dict]:
  """Per criterion: the cheapest point whose Acc@0.5 is within ACC_TOLERANCE of the
  no-exit scan on the split that chooses (`result["criteria"]`), reported on the
  reporting split (`result["reported"]`, the same split when there is none): its
  accuracy, GFLOPs, measured speedup over the no-exit path (`speed_entry`) and the
  share of the analytic GFLOPs saving it realises."""
  reported = result.get("reported") or result
  base = reported["no_exit"]
  by_spec = {p["criterion"]: p for pts in reported["criteria"].values() for p in pts}
  out = {}
  for name, chosen in _cheapest_points(result["no_exit"], result["criteria"]).items():
    best = by_spec[chosen["criterion"]]
    entry = {"spec": best["criterion"], "acc@0.5": best["acc@0.5"], "gflops": best["gflops"],
             "gflops_ratio": base["gflops"] / best["gflops"],
             "chosen_on": result["split"], "reported_on": reported["split"],
             "acc@0.5_where_chosen": chosen["acc@0.5"]}
    entry.update(speed_entry(best, base, entry["gflops_ratio"]))
    out[name] = entry
  return out


def _split_view(cfg, metrics, chosen: Sequence[str], split: str) -> dict:
  """{split, count, no_exit, oracle, criteria}: every spec's after-the-fact point."""
  points = {spec: evaluate.exit_report(cfg, metrics, evaluate.parse_criterion(spec, cfg))
            for spec in chosen}
  criteria: dict[str, list] = {}
  for spec in chosen:
    criteria.setdefault(spec.split(":")[0], []).append(points[spec])
  return {"split": split, "count": metrics.count,
          "no_exit": next(points[s] for s in chosen if s.split(":")[0] == "last_scale"),
          "oracle": next(points[s] for s in chosen if s.split(":")[0] == "oracle"),
          "criteria": criteria, "_points": points}


def collect_split(config: ExperimentConfig, params: Any, mesh: Mesh, shardings: Any,
                  split: str, progress: bool = True):
  """The full scan's per-sample rows (`RecMetrics`) of `split`; UserError when empty."""
  cfg = config.model
  metrics, _ = evaluate.collect(cfg, params, EvalStep(cfg, mesh, shardings),
                                data_source.eval_batches(config, split, mesh), mesh,
                                config.eval.iou_threshold, desc=f"eval {split}",
                                progress=progress)
  if metrics.count == 0:
    raise UserError(f"split {split!r} has no samples")
  return metrics


def run_sweep(config: ExperimentConfig, params: Any, mesh: Mesh, shardings: Any, split: str,
              specs: Optional[Sequence[str]] = None, measure: bool = True,
              progress: bool = True, report_split: Optional[str] = None,
              collected: Optional[tuple[Any, Any]] = None,
              also_time: Sequence[str] = ()) -> dict:
  """The sweep's result (module docstring) for `params`: curves and operating points
  chosen on `split`; with `report_split`, the same curves on it (`reported`) and the
  operating points' numbers and timings from it (held out from the choice).

  `collected`: the (`split`, reporting split) rows when the caller already has them
  (`collect_split`), so a process that also calibrates runs each split once.
  `also_time`: more specs timed on the exit path in the same program and passes,
  paired like the operating points; their facts come back under `also_timed`, outside
  the curves.
  """
  cfg = config.model
  chosen, skipped = usable_specs(config, specs)
  report_split = report_split or split
  if collected is None:
    metrics = collect_split(config, params, mesh, shardings, split, progress)
    report_metrics = metrics if report_split == split else collect_split(
        config, params, mesh, shardings, report_split, progress)
  else:
    metrics, report_metrics = collected
  view = _split_view(cfg, metrics, chosen, split)
  reported = view if report_split == split else _split_view(cfg, report_metrics, chosen,
                                                            report_split)
  plain_samples_per_s, also_timed = None, {}
  if measure:
    # The reporting split's first batches again (the same order as its metrics).
    timed = evaluate.first_device_batches(config, report_split, mesh)
    paired = [p["criterion"] for p in _cheapest_points(view["no_exit"],
                                                       view["criteria"]).values()]
    extra = [spec for spec in also_time if spec not in chosen]
    measured, plain_samples_per_s = measure_exit_path(
        config, params, mesh, shardings, timed, [*chosen, *extra], report_metrics,
        [*paired, *also_time], progress=progress)
    for spec, facts_of_spec in measured.items():
      if spec in chosen:
        reported["_points"][spec].update(facts_of_spec)
    also_timed = {spec: measured[spec] for spec in also_time}
  view.pop("_points")
  reported.pop("_points", None)
  result = {**view, "chosen_on": split, "reported_on": reported["split"],
            "plain_eval_samples_per_s": plain_samples_per_s, "skipped": skipped}
  if reported is not view:
    result["reported"] = reported
  result["operating_points"] = operating_points(result)
  if also_time:
    result["also_timed"] = also_timed
  return result


def write_sweep(result: dict, out_dir: str, title: str = "") -> tuple[str, str]:
  """DIR/exit_sweep.json and DIR/exit_sweep.png; returns both paths."""
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, "exit_sweep.json")
  tmp = json_path + ".partial"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, json_path)
  png_path = os.path.join(out_dir, "exit_sweep.png")
  plot_sweep(result, png_path, title)
  return json_path, png_path


def _speedup(point: dict, no_exit: dict) -> Optional[tuple[float, float, float]]:
  """(speedup, lower, upper) of a timed point over no exit: the paired median with its
  interquartile range when paired, else the ratio of fastest passes (no bar)."""
  if "paired_speedup" in point:
    spread = point["paired_speedup"]
    return spread["median"], spread["q25"], spread["q75"]
  if "samples_per_s" not in point or "samples_per_s" not in no_exit:
    return None
  ratio = point["samples_per_s"] / no_exit["samples_per_s"]
  return ratio, ratio, ratio


def plot_sweep(result: dict, path: str, title: str = "") -> None:
  """Acc@0.5 vs analytic GFLOPs (and vs measured speedup over no exit when measured),
  on the reporting split, the operating points (chosen on `result["split"]`) ringed;
  the right panel's bars are the interquartile range of the paired ratios."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  view = result.get("reported") or result
  base, oracle = view["no_exit"], view["oracle"]
  measured = "samples_per_s" in base
  x_of = {"gflops": lambda p: p["gflops"],
          "speedup": lambda p: (_speedup(p, base) or (float("nan"),) * 3)[0]}
  axes_keys = [("gflops", "analytic GFLOPs / sample (patches read up to the exit)")]
  if measured:
    axes_keys.append(("speedup", "measured speedup over no exit (real exit path; bars: "
                      "IQR of paired ratios)"))
  ops = {op["spec"] for op in result.get("operating_points", {}).values()}
  fig, axes = plt.subplots(1, len(axes_keys), figsize=(6.5 * len(axes_keys), 4.8),
                           squeeze=False)
  for ax, (key, label) in zip(axes[0], axes_keys):
    x = x_of[key]
    for name, points in sorted(view["criteria"].items()):
      if name in ("last_scale", "oracle"):
        continue
      pts = sorted(points, key=x)
      line, = ax.plot([x(p) for p in pts], [p["acc@0.5"] for p in pts], "o-", label=name,
                      ms=4)
      for p in pts:
        if key == "speedup" and "paired_speedup" in p:
          mid, low, high = _speedup(p, base)
          ax.errorbar([mid], [p["acc@0.5"]], xerr=[[mid - low], [high - mid]],
                      color=line.get_color(), capsize=3, lw=1)
        if p["criterion"] in ops:
          ax.plot([x(p)], [p["acc@0.5"]], "o", ms=11, mfc="none", color=line.get_color())
    ax.plot([x(base)], [base["acc@0.5"]], "ks", ms=9, label="no exit (last scale)")
    ax.plot([x(oracle)], [oracle["acc@0.5"]], "r*", ms=14, label="oracle (reads the answer)")
    ax.axhline(base["acc@0.5"] - ACC_TOLERANCE, color="gray", ls=":", lw=1)
    ax.set_xlabel(label, fontsize=9)
    ax.set_ylabel("Acc@0.5")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8, loc="lower right")
  where = (f"chosen on {result['split']}, reported on {view['split']}"
           if view is not result else f"on {result['split']}")
  fig.suptitle((title or "early exit") + f" ({where}, {view['count']} expressions; "
               "rings: operating points)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def format_sweep(result: dict) -> str:
  """A readable table of the sweep (the reporting split's points), with the operating
  points and the statistic each speed is."""
  view = result.get("reported") or result
  lines = [f"chosen on {result['split']} ({result['count']} expressions), reported on "
           f"{view['split']} ({view['count']})",
           f"{'criterion':<24}{'acc@0.5':>9}{'mIoU':>8}{'exit':>6}{'GFLOPs':>9}"
           f"{'samples/s':>11}{'agree':>7}{'forced':>7}  exit histogram"]
  for name, points in sorted(view["criteria"].items()):
    for p in points:
      sps = f"{p['samples_per_s']:>11.1f}" if "samples_per_s" in p else f"{'-':>11}"
      agree = f"{p['exit_scale_agreement']:>7.3f}" if "exit_scale_agreement" in p else f"{'-':>7}"
      forced = f"{p['forced_exits']:>7d}" if "forced_exits" in p else f"{'-':>7}"
      lines.append(f"{p['criterion']:<24}{p['acc@0.5']:>9.4f}{p['mean_iou']:>8.4f}"
                   f"{p['mean_exit_scale']:>6.2f}{p['gflops']:>9.4f}{sps}{agree}{forced}  "
                   f"{p['exit_histogram']}")
  if result.get("plain_eval_samples_per_s"):
    lines.append(f"plain sparse eval (no exit machinery), fastest pass: "
                 f"{result['plain_eval_samples_per_s']:.1f} samples/s")
  overhead = view["no_exit"].get("paired_over_plain")
  if overhead:
    lines.append("exit path at no exit over the plain sparse eval (median of paired ratios, "
                 "> 1: faster): " + timing.format_spread(overhead))
  lines.append(f"operating points (Acc@0.5 within {ACC_TOLERANCE} of no exit on "
               f"{result['split']}, fewest GFLOPs), reported on {view['split']}:")
  for name, op in sorted(result["operating_points"].items()):
    text = (f"  {op['spec']:<22} acc {op['acc@0.5']:.4f}, GFLOPs x{op['gflops_ratio']:.2f} fewer")
    if "speedup_spread" in op:
      text += (f", speedup {timing.format_spread(op['speedup_spread'])} = median of paired "
               f"ratios over the no-exit path ({op['realised']:.2f} of the GFLOPs saving)")
    elif "speedup" in op:
      text += (f", speedup {op['speedup']:.2f}x = {op['samples_per_s']:.1f} / "
               f"{op['no_exit_samples_per_s']:.1f} samples/s (fastest passes; "
               f"{op['realised']:.2f} of the GFLOPs saving)")
    lines.append(text)
  for spec, why in result["skipped"].items():
    lines.append(f"  skipped {spec}: {why}")
  return "\n".join(lines)
