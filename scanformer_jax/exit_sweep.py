"""Early-exit curves: every criterion over its threshold grid, on one split.

`scanformer eval --exit-sweep DIR` runs the sparse evaluation ONCE, applies every
criterion (`early_exit.py`, each at every threshold of its `grid`, or the specs
given) to the stored per-sample outputs, and reports per point: Acc@0.5, mean IoU,
mean exit scale, the exit-scale histogram and the analytic GFLOPs per sample of the
patches read up to the exit (`evaluate.gflops_at_exit`). The evaluation streams the
split (one batch on the device at a time). With `measure` it then runs the real exit
path (`exit_scan.ExitScan`: ONE compiled program for every criterion and threshold,
both arguments) over the split's first `evaluate.TIMED_BATCHES` batches, kept on the
device, and adds the measured samples/s (the fastest of a few passes; the plain
sparse eval is timed the same way), the forced (overflow) exits and whether its exit
scales agree with the after-the-fact ones on those samples (`checked_samples`).
Writes DIR/exit_sweep.json and DIR/exit_sweep.png (accuracy vs GFLOPs and vs
measured samples/s; one line per criterion, the oracle and the no-exit point marked).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from scanformer_jax import data_source, early_exit, evaluate, sharding as sharding_lib
from scanformer_jax.config import ExperimentConfig
from scanformer_jax.errors import UserError
from scanformer_jax.eval_step import EvalStep
from scanformer_jax.exit_scan import ExitScan

# An operating point keeps Acc@0.5 within this of the no-exit scan (issue 13).
ACC_TOLERANCE = 0.01
# Timed passes of each operating point, each beside a pass of the no-exit path.
PAIRED_PASSES = 7


def usable_specs(config: ExperimentConfig, specs: Optional[Sequence[str]]
                 ) -> tuple[list[str], dict[str, str]]:
  """(specs this model can run, {skipped criterion: why}). Given specs must all run."""
  chosen, skipped = [], {}
  for spec in early_exit.sweep_specs(list(specs) if specs else None):
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
  timed the same way over `device_batches` (the first batches of the split `metrics`
  holds, `evaluate.first_device_batches`): one compiled program for every criterion and
  threshold (compiled before timing), the fastest of `passes` passes
  (`evaluate.best_pass`). The `paired` specs (the operating points) are timed
  `PAIRED_PASSES` times, each pass beside a pass of the no-exit path (`last_scale`):
  `paired_speedup` is the median of the per-pair ratios, a speedup from timings
  seconds apart, not minutes (on a shared host the speed drifts by tens of percent
  over a sweep, and two points doing identical work differed by 24 %).
  """
  cfg = config.model
  count = sum(int(np.asarray(sharding_lib.fetch(b["valid"])).sum()) for b in device_batches)
  plain = EvalStep(cfg, mesh, shardings)
  seconds, _ = evaluate.best_pass(lambda: [plain(params, b) for b in device_batches], passes)
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
    if spec in paired:  # Alternate with the no-exit path: drift hits both alike.
      times, last = evaluate.alternating_passes(
          {"no_exit": lambda: run(no_exit), "point": lambda c=criterion: run(c)},
          PAIRED_PASSES)
      outs, seconds = last["point"], min(times["point"])
      ratios = np.asarray(times["no_exit"]) / np.maximum(times["point"], 1e-9)
      extra = {"paired_speedup": float(np.median(ratios)), "paired_passes": PAIRED_PASSES,
               "paired_no_exit_samples_per_s": float(count / max(min(times["no_exit"]),
                                                                 1e-9))}
    else:
      seconds, outs = evaluate.best_pass(lambda c=criterion: run(c), passes)
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


def operating_points(result: dict) -> dict[str, dict]:
  """Per criterion: the cheapest point whose Acc@0.5 is within ACC_TOLERANCE of the
  no-exit scan, with its measured speedup over the no-exit exit path (the paired
  median when measured so, `measure_exit_path`) and the share of the analytic
  GFLOPs saving it realises (speedup / GFLOPs ratio)."""
  base = result["no_exit"]
  out = {}
  for name, best in _cheapest_points(base, result["criteria"]).items():
    entry = {"spec": best["criterion"], "acc@0.5": best["acc@0.5"], "gflops": best["gflops"],
             "gflops_ratio": base["gflops"] / best["gflops"]}
    if "samples_per_s" in best and "samples_per_s" in base:
      entry["samples_per_s"] = best["samples_per_s"]
      entry["no_exit_samples_per_s"] = best.get("paired_no_exit_samples_per_s",
                                                base["samples_per_s"])
      entry["speedup"] = best.get("paired_speedup",
                                  entry["samples_per_s"] / entry["no_exit_samples_per_s"])
      entry["realised"] = entry["speedup"] / entry["gflops_ratio"]
    out[name] = entry
  return out


def run_sweep(config: ExperimentConfig, params: Any, mesh: Mesh, shardings: Any, split: str,
              specs: Optional[Sequence[str]] = None, measure: bool = True,
              progress: bool = True) -> dict:
  """The sweep's result (module docstring) for `params` on `split`."""
  cfg = config.model
  chosen, skipped = usable_specs(config, specs)
  metrics, _ = evaluate.collect(cfg, params, EvalStep(cfg, mesh, shardings),
                                data_source.eval_batches(config, split, mesh), mesh,
                                config.eval.iou_threshold, desc=f"eval {split}",
                                progress=progress)
  if metrics.count == 0:
    raise UserError(f"--exit-sweep: split {split!r} has no samples")
  points = {spec: evaluate.exit_report(cfg, metrics, evaluate.parse_criterion(spec, cfg))
            for spec in chosen}
  criteria: dict[str, list] = {}
  for spec in chosen:
    criteria.setdefault(spec.split(":")[0], []).append(points[spec])
  no_exit = next(points[s] for s in chosen if s.split(":")[0] == "last_scale")
  oracle = next(points[s] for s in chosen if s.split(":")[0] == "oracle")
  plain_samples_per_s = None
  if measure:
    # The split's first batches again (the same order as `metrics`), for timing.
    timed = evaluate.first_device_batches(config, split, mesh)
    paired = [p["criterion"] for p in _cheapest_points(no_exit, criteria).values()]
    measured, plain_samples_per_s = measure_exit_path(config, params, mesh, shardings,
                                                      timed, chosen, metrics, paired,
                                                      progress=progress)
    for spec, facts_of_spec in measured.items():
      points[spec].update(facts_of_spec)
  result = {"split": split, "count": metrics.count,
            "plain_eval_samples_per_s": plain_samples_per_s,
            "no_exit": no_exit, "oracle": oracle, "criteria": criteria, "skipped": skipped}
  result["operating_points"] = operating_points(result)
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


def plot_sweep(result: dict, path: str, title: str = "") -> None:
  """Acc@0.5 vs analytic GFLOPs (and vs measured samples/s when measured)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  measured = "samples_per_s" in result["no_exit"]
  axes_keys = [("gflops", "analytic GFLOPs / sample (patches read up to the exit)")]
  if measured:
    axes_keys.append(("samples_per_s", "measured samples / s (real exit path)"))
  fig, axes = plt.subplots(1, len(axes_keys), figsize=(6.5 * len(axes_keys), 4.8),
                           squeeze=False)
  for ax, (key, label) in zip(axes[0], axes_keys):
    for name, points in sorted(result["criteria"].items()):
      if name in ("last_scale", "oracle"):
        continue
      pts = sorted(points, key=lambda p: p[key])
      ax.plot([p[key] for p in pts], [p["acc@0.5"] for p in pts], "o-", label=name, ms=4)
    base, oracle = result["no_exit"], result["oracle"]
    ax.plot([base[key]], [base["acc@0.5"]], "ks", ms=9, label="no exit (last scale)")
    ax.plot([oracle[key]], [oracle["acc@0.5"]], "r*", ms=14, label="oracle (reads the answer)")
    ax.axhline(base["acc@0.5"] - ACC_TOLERANCE, color="gray", ls=":", lw=1)
    ax.set_xlabel(label)
    ax.set_ylabel("Acc@0.5")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8, loc="lower right")
  fig.suptitle(title or f"early exit on {result['split']} ({result['count']} expressions)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def format_sweep(result: dict) -> str:
  """A readable table of the sweep, with the operating points."""
  lines = [f"{'criterion':<24}{'acc@0.5':>9}{'mIoU':>8}{'exit':>6}{'GFLOPs':>9}"
           f"{'samples/s':>11}{'agree':>7}{'forced':>7}  exit histogram"]
  for name, points in sorted(result["criteria"].items()):
    for p in points:
      sps = f"{p['samples_per_s']:>11.1f}" if "samples_per_s" in p else f"{'-':>11}"
      agree = f"{p['exit_scale_agreement']:>7.3f}" if "exit_scale_agreement" in p else f"{'-':>7}"
      forced = f"{p['forced_exits']:>7d}" if "forced_exits" in p else f"{'-':>7}"
      lines.append(f"{p['criterion']:<24}{p['acc@0.5']:>9.4f}{p['mean_iou']:>8.4f}"
                   f"{p['mean_exit_scale']:>6.2f}{p['gflops']:>9.4f}{sps}{agree}{forced}  "
                   f"{p['exit_histogram']}")
  if result.get("plain_eval_samples_per_s"):
    lines.append(f"plain sparse eval (no exit machinery), timed the same way: "
                 f"{result['plain_eval_samples_per_s']:.1f} samples/s")
  lines.append(f"operating points (Acc@0.5 within {ACC_TOLERANCE} of no exit, fewest GFLOPs):")
  for name, op in sorted(result["operating_points"].items()):
    text = (f"  {op['spec']:<22} acc {op['acc@0.5']:.4f}, GFLOPs x{op['gflops_ratio']:.2f} fewer")
    if "speedup" in op:
      text += (f", {op['samples_per_s']:.1f} vs {op['no_exit_samples_per_s']:.1f} samples/s "
               f"without exit (timed alongside) = {op['speedup']:.2f}x ({op['realised']:.2f} "
               "of the GFLOPs saving)")
    lines.append(text)
  for spec, why in result["skipped"].items():
    lines.append(f"  skipped {spec}: {why}")
  return "\n".join(lines)
