"""The exit path's cost when nothing exits, and its speedups, pinned down by many pairs.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python experiments/bench_exit_overhead.py --workdir runs/demo --pairs 40

Times the exit path (`exit_scan.ExitScan`, one program for every criterion, with the
run's sub-batch sizes) at `last_scale`, where every sample runs every scale, against
the plain sparse eval step on the same device batches (the split's first
`evaluate.TIMED_BATCHES`); then each operating point (`--points`, default the
thresholds `eval --exit-calibrate` chose, from W/exit_calibration.json) against the
exit path at no exit, as the sweep and the calibration do. Pairs alternate their
order (base first, then the other first) so that a cost of running second falls on
both. A control pairs the plain step with a second copy of itself: its ratios show
the noise and any bias of the pairing. Prints, and writes with --json, the median of
the per-pair ratios (base seconds / other seconds) with its quartiles and a
bootstrap 95 % interval of the median, and each point's realised share of its GFLOPs
saving (speedup / GFLOPs ratio) where exit_calibration.json reports that ratio on the
timed split. The sweep and the calibration time these in 7 pairs, too few to tell a
5 % difference from noise on a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scanformer_jax import early_exit, evaluate, timing, workdir  # noqa: E402
from scanformer_jax.eval_step import EvalStep  # noqa: E402
from scanformer_jax.exit_scan import ExitScan  # noqa: E402


def paired_seconds(first, second, pairs: int) -> tuple[list[float], list[float]]:
  """Seconds per pass of `first()` and `second()` over `pairs` rounds, the order
  swapped every round."""
  a, b = [], []
  for i in range(pairs):
    if i % 2 == 0:
      a.append(timing.timed_pass(first)[0])
      b.append(timing.timed_pass(second)[0])
    else:
      b.append(timing.timed_pass(second)[0])
      a.append(timing.timed_pass(first)[0])
  return a, b


def ratio_summary(base: list[float], other: list[float], seed: int = 0) -> dict:
  """`timing.paired_ratios` of base / other, with a bootstrap 95 % interval of the median."""
  ratios = np.asarray(base) / np.asarray(other)
  rng = np.random.default_rng(seed)
  medians = np.median(rng.choice(ratios, (2000, ratios.size)), axis=1)
  low, high = np.percentile(medians, [2.5, 97.5])
  return {**timing.paired_ratios(base, other), "median_ci95": [float(low), float(high)]}


def describe(summary: dict) -> str:
  low, high = summary["median_ci95"]
  return (f"median {summary['median']:.3f} (95 % CI {low:.3f}-{high:.3f}, IQR "
          f"{summary['q25']:.3f}-{summary['q75']:.3f}, {summary['n']} pairs)")


def operating_points(workdir_path: str, points: str | None, split: str
                     ) -> tuple[list[str], dict[str, float]]:
  """(the specs to time, {spec: GFLOPs ratio of no exit over it on `split`}): `points`
  when given, else the thresholds W/exit_calibration.json chose; the ratios from its
  report when it reported on `split`."""
  from scanformer_jax import exit_calibration  # pylint: disable=g-import-not-at-top
  path = exit_calibration.path(workdir_path)
  facts = json.load(open(path)) if os.path.isfile(path) else {}
  report = facts.get("report") or {}
  on_split = report.get("split") == split
  ratios = {e["spec"]: e["gflops_ratio"] for e in report.get("criteria", {}).values()
            if on_split and e.get("spec") and e.get("gflops_ratio")}
  if points is not None:
    return [p.strip() for p in points.split(",") if p.strip()], ratios
  chosen = [e["spec"] for e in facts.get("criteria", {}).values()
            if e.get("threshold") is not None]
  return chosen, ratios


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a trained, calibrated run")
  parser.add_argument("--split", default="test", help="the batches timed")
  parser.add_argument("--pairs", type=int, default=40, help="paired rounds per comparison")
  parser.add_argument("--points", default=None,
                      help="comma-separated criterion specs timed against no exit "
                           "(default: the calibrated thresholds of exit_calibration.json)")
  parser.add_argument("--json", default=None, help="also write the summary here")
  args = parser.parse_args(argv)
  run = workdir.load_for_inference(args.workdir, None, None)
  config, cfg = run.config, run.config.model
  batches = evaluate.first_device_batches(config, args.split, run.mesh)
  points, gflops_ratios = operating_points(args.workdir, args.points, args.split)
  plain, control = (EvalStep(cfg, run.mesh, run.param_shardings) for _ in range(2))
  criteria = {}
  for spec in ["last_scale", *points]:
    criterion = early_exit.parse(spec)
    criteria.setdefault(criterion.name, criterion)
  exit_path = ExitScan(cfg, run.mesh, run.param_shardings, list(criteria.values()),
                       config.eval.exit_sub_batches)

  def exit_run(spec):
    criterion = early_exit.parse(spec)
    return lambda: [exit_path(run.params, b, criterion.threshold, criterion.name)
                    for b in batches]
  runs = {"plain": lambda: [plain(run.params, b) for b in batches],
          "control": lambda: [control(run.params, b) for b in batches],
          **{spec: exit_run(spec) for spec in ["last_scale", *points]}}
  for fn in runs.values():  # Compile, and one untimed pass each.
    jax.block_until_ready(fn())
  count = sum(int(np.asarray(jax.device_get(b["valid"])).sum()) for b in batches)
  result = {"workdir": args.workdir, "split": args.split, "samples_per_pass": count,
            "devices": jax.device_count(), "sub_batches": list(config.eval.exit_sub_batches),
            "points": {}}
  plain_s, exit_s = paired_seconds(runs["plain"], runs["last_scale"], args.pairs)
  base_s, control_s = paired_seconds(runs["plain"], runs["control"], args.pairs)
  result.update(exit_path_over_plain=ratio_summary(plain_s, exit_s),
                control_over_plain=ratio_summary(base_s, control_s),
                plain_samples_per_s=count / float(np.median(plain_s)),
                exit_path_samples_per_s=count / float(np.median(exit_s)))
  for name in ("exit_path_over_plain", "control_over_plain"):
    print(f"{name}: {describe(result[name])}")
  print(f"samples/s (median pass): plain {result['plain_samples_per_s']:.0f}, exit path at "
        f"no exit {result['exit_path_samples_per_s']:.0f}")
  for spec in points:
    no_exit_s, point_s = paired_seconds(runs["last_scale"], runs[spec], args.pairs)
    entry = {"speedup": ratio_summary(no_exit_s, point_s)}
    line = f"{spec} over the exit path at no exit: {describe(entry['speedup'])}"
    if spec in gflops_ratios:
      entry["gflops_ratio"] = gflops_ratios[spec]
      entry["realised"] = entry["speedup"]["median"] / gflops_ratios[spec]
      line += (f"; GFLOPs ratio {gflops_ratios[spec]:.3f}, realised "
               f"{entry['realised']:.3f} of the saving")
    result["points"][spec] = entry
    print(line)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
      f.write("\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
