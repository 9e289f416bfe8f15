"""`scanformer eval --workdir W [--config PATH] [--split S ...] [--mode M] [--json PATH]`.

Evaluates the newest readable checkpoint of W (or `--step N`) with the sparse path
(`--mode dense`: the dense path, to measure what sparsity saves) on each split
(default: the config's `data.eval_splits`) and prints one line per split;
`--json` writes `{split: report}` (see scanformer_jax/evaluate.py for the keys);
`--gallery DIR` writes the split's HTML gallery (scanformer_jax/visualize/gallery.py);
`--exit-sweep DIR` writes early-exit curves instead (scanformer_jax/exit_sweep.py);
`--exit-calibrate` chooses exit thresholds with a risk guarantee and writes
W/exit_calibration.json (scanformer_jax/exit_calibration.py), which
`--exit-criterion calibrated:<name>` then runs. Both choose on `--split` and, with
`--report-split S`, report on S (held out); given together they share one run of each
split and one compiled exit path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

from scanformer_jax import risk_control
from scanformer_jax.cli import common
from scanformer_jax.errors import UserError

# --exit-calibrate's settings and their defaults (None: not given).
CALIBRATION_DEFAULTS = {"risk": 0.01, "delta": 0.1, "guarantee": "high-probability",
                        "loss": "acc_drop", "margin": 0.1, "p_value": "hb"}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="scanformer eval",
                                   description="Evaluate a workdir's checkpoint.")
  common.add_workdir_args(parser)
  parser.add_argument("--split", action="append", default=[],
                      help="split to evaluate (repeatable or comma-separated); "
                      "default: data.eval_splits")
  parser.add_argument("--json", metavar="PATH", help="write the reports here")
  parser.add_argument("--step", type=int, help="checkpoint step (default: newest)")
  parser.add_argument("--mode", choices=("sparse", "dense"), default=None,
                      help="scan path (default: the plan `scanformer calibrate` measured "
                      "faster at eval.batch_size, else sparse; dense runs every patch)")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--gallery", metavar="DIR", help="write an HTML gallery of the split "
                      "(DIR/index.html + scan pictures; needs a single --split)")
  parser.add_argument("--gallery-size", type=int, default=24, metavar="N",
                      help="samples in the gallery: worst misses, best hits, random")
  parser.add_argument("--exit-sweep", metavar="DIR",
                      help="early-exit curves instead of the report: every criterion over "
                      "its thresholds, after the fact and on the real exit path; writes "
                      "DIR/exit_sweep.json and DIR/exit_sweep.png (needs a single --split)")
  parser.add_argument("--exit-criteria", default="", metavar="SPECS",
                      help="with --exit-sweep: comma-separated criteria (e.g. "
                      "iou_head:0.7,box_stability:0.9); default every registered one "
                      "at every threshold of its grid; with --exit-calibrate: names "
                      "(their calibration grid) or name:threshold specs to calibrate (with "
                      "both, the sweep takes every criterion)")
  parser.add_argument("--exit-criterion", metavar="SPEC",
                      help="report this early-exit criterion beside the full scan (sets "
                      "eval.exit_criterion), e.g. halt_head:0.9 or calibrated:halt_head "
                      "(the threshold --exit-calibrate chose for this workdir)")
  parser.add_argument("--report-split", metavar="S",
                      help="with --exit-sweep / --exit-calibrate: choose on --split, report "
                      "on S (held out)")
  calibrate = parser.add_argument_group(
      "exit calibration", "--exit-calibrate: per criterion, the most aggressive threshold "
      "whose risk is <= --risk with probability >= 1 - --delta over the draw of the split "
      "(or in expectation); writes W/exit_calibration.json")
  calibrate.add_argument("--exit-calibrate", action="store_true")
  calibrate.add_argument("--risk", type=float, metavar="EPS",
                         help=f"largest risk allowed (default {CALIBRATION_DEFAULTS['risk']})")
  calibrate.add_argument("--delta", type=float, metavar="DELTA",
                         help="allowed probability of a threshold breaking the bound "
                         f"(default {CALIBRATION_DEFAULTS['delta']})")
  calibrate.add_argument("--guarantee", choices=risk_control.GUARANTEES,
                         help="high-probability (Learn-then-Test, default) or expectation "
                         "(conformal risk control)")
  calibrate.add_argument("--loss", choices=risk_control.LOSSES,
                         help="acc_drop (right at the last scale, wrong at the exit; "
                         "default) or iou_drop (IoU lower than the last scale's by more "
                         "than --margin)")
  calibrate.add_argument("--margin", type=float, help="iou_drop's margin (default 0.1)")
  calibrate.add_argument("--p-value", choices=risk_control.P_VALUES,
                         help="hb: Hoeffding-Bentkus (default); wsr: Waudby-Smith-Ramdas")
  calibrate.add_argument("--no-timing", action="store_true",
                         help="skip timing the chosen thresholds on the exit path")
  return parser


def _check_gallery_args(args, splits: list[str]) -> None:
  given = [f"--{k.replace('_', '-')}" for k in CALIBRATION_DEFAULTS
           if getattr(args, k) is not None]
  if given and not args.exit_calibrate:
    raise UserError(f"{', '.join(given)} needs --exit-calibrate")
  if args.exit_calibrate:
    if len(splits) != 1:
      raise UserError(f"--exit-calibrate calibrates on one split, got {', '.join(splits)}: "
                      "add --split NAME")
    if args.gallery or args.mode == "dense" or args.exit_criterion:
      raise UserError("--exit-calibrate runs alone or with --exit-sweep: drop --gallery / "
                      "--mode / --exit-criterion")
    for key, default in CALIBRATION_DEFAULTS.items():
      if getattr(args, key) is None:
        setattr(args, key, default)
    for key in ("risk", "delta"):
      if not 0 < getattr(args, key) < 1:
        raise UserError(f"--{key} {getattr(args, key)} must lie in (0, 1)")
    if not 0 <= args.margin < 1:
      raise UserError(f"--margin {args.margin} must lie in [0, 1)")
    return
  if args.report_split and not args.exit_sweep:
    raise UserError("--report-split needs --exit-sweep DIR or --exit-calibrate")
  if args.exit_sweep and args.exit_criterion:
    raise UserError("--exit-criterion reports one criterion; --exit-sweep takes --exit-criteria")
  if args.exit_sweep and len(splits) != 1:
    raise UserError(f"--exit-sweep sweeps one split, got {', '.join(splits)}: add --split NAME")
  if args.exit_sweep and (args.gallery or args.mode == "dense"):
    raise UserError("--exit-sweep runs alone: drop --gallery / --mode")
  if args.exit_criteria and not args.exit_sweep:
    raise UserError("--exit-criteria needs --exit-sweep DIR or --exit-calibrate")
  if args.gallery and len(splits) != 1:
    raise UserError(f"--gallery shows one split, got {', '.join(splits)}: add --split NAME")
  if args.gallery and args.gallery_size < 1:
    raise UserError(f"--gallery-size {args.gallery_size} must be >= 1")


def format_report(split: str, r: dict) -> str:
  if not r.get("count"):
    return f"{split}: no samples"
  per_scale = " ".join(f"{a:.3f}" for a in r["acc@0.5_per_scale"])
  keep = " ".join(f"{k:.2f}" for k in r["keep_ratio"])
  return (f"{split}: acc@0.5 {r['acc@0.5']:.4f} (per scale {per_scale}) "
          f"mIoU {r['mean_iou']:.4f} keep [{keep}] {r['mode']}: GFLOPs "
          f"{r['gflops_as_run']:.3f} as run / {r['gflops_kept']:.3f} kept / "
          f"{r['gflops_dense']:.3f} dense, overflow {r['overflow_fraction']:.4f} "
          f"({r['patches_dropped']} patches dropped) "
          f"{r['samples_per_s']:.1f} samples/s (model {r['model_samples_per_s']:.1f}) "
          f"n={r['count']}" + _format_groups(r.get("acc@0.5_by_group"))
          + _format_exit(r.get("early_exit")))


def _format_groups(groups) -> str:
  if not groups:
    return ""
  return "\n  acc@0.5 by expression: " + ", ".join(
      f"{name} {g['acc@0.5']:.3f} (n={g['count']})" for name, g in groups.items())


def calibrate_hint(report: dict, cfg, workdir: str) -> str | None:
  """One line when an uncalibrated sparse evaluation ran more GFLOPs than dense would:
  its slots are every patch plus the merged tokens, until `calibrate` sizes them."""
  if (report.get("mode") != "sparse" or cfg.capacity is not None
      or cfg.capacity_buckets is not None or not report.get("count")
      or report["gflops_as_run"] <= report["gflops_dense"]):
    return None
  return (f"hint: the uncalibrated sparse path ran {report['gflops_as_run']:.3f} GFLOPs per "
          f"sample, more than dense ({report['gflops_dense']:.3f}); `scanformer calibrate "
          f"--workdir {workdir}` sizes its slots to what the model selects and times it "
          "against dense")


def eval_plan(args, config) -> tuple[str, str | None]:
  """(mode, the line saying why): `--mode` when given, else the plan `calibrate`
  recorded for eval.batch_size (capacity.mode_for), else sparse."""
  from scanformer_jax import capacity  # pylint: disable=g-import-not-at-top
  if args.mode:
    return args.mode, None
  return capacity.mode_for(capacity.plans_of(config), config.eval.batch_size)


def _format_exit(e) -> str:
  if not e:
    return ""
  return (f"\n  early exit {e['criterion']}: acc@0.5 {e['acc@0.5']:.4f} mIoU "
          f"{e['mean_iou']:.4f}, mean exit scale {e['mean_exit_scale']:.2f}, "
          f"{e['gflops']:.4f} GFLOPs, exits per scale {e['exit_histogram']}")


def strict_json(value: Any) -> tuple[Any, int]:
  """`value` with every non-finite float replaced by None, and how many were replaced.

  `json.dump` would write NaN / Infinity, which strict JSON readers reject.
  """
  if isinstance(value, float) and not math.isfinite(value):
    return None, 1
  if isinstance(value, dict):
    pairs = [(k, strict_json(v)) for k, v in value.items()]
    return {k: v for k, (v, _) in pairs}, sum(n for _, (_, n) in pairs)
  if isinstance(value, (list, tuple)):
    items = [strict_json(v) for v in value]
    return [v for v, _ in items], sum(n for _, n in items)
  return value, 0


def write_json_report(reports: dict[str, dict], path: str) -> None:
  """Writes `{split: report}` as strict JSON (atomically); non-finite numbers become
  null and are counted in each report's `non_finite_values`."""
  out = {}
  for split, report in reports.items():
    clean, count = strict_json(report)
    out[split] = {**clean, "non_finite_values": count}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  partial = f"{path}.partial"
  with open(partial, "w") as f:
    json.dump(out, f, indent=2, allow_nan=False)
    f.write("\n")
  os.replace(partial, path)


def _exit_sweep(args, config, run, split: str) -> int:
  """`--exit-sweep DIR`: scanformer_jax/exit_sweep.py's curves of `split`."""
  from scanformer_jax import exit_sweep  # pylint: disable=g-import-not-at-top
  specs = [c.strip() for c in args.exit_criteria.split(",") if c.strip()]
  result = exit_sweep.run_sweep(config, run.params, run.mesh, run.param_shardings, split,
                                specs or None, progress=not args.no_progress,
                                report_split=args.report_split)
  _write_sweep(args, config, run, split, result)
  return 0


def _write_sweep(args, config, run, split: str, result: dict) -> None:
  """Writes and prints a sweep's result (process 0)."""
  import jax  # pylint: disable=g-import-not-at-top
  from scanformer_jax import exit_sweep  # pylint: disable=g-import-not-at-top
  result = {"step": run.step, **result}
  if jax.process_index() == 0:
    clean, _ = strict_json(result)
    json_path, png_path = exit_sweep.write_sweep(
        clean, args.exit_sweep, f"early exit: {config.data.dataset}, step {run.step}")
    print(f"checkpoint step {run.step}, split {split}, {result['count']} expressions")
    print(exit_sweep.format_sweep(result))
    print(f"wrote {json_path} and {png_path}")


def _exit_calibrate(args, config, run, split: str) -> int:
  """`--exit-calibrate`: scanformer_jax/exit_calibration.py on `split`, reported on
  `--report-split` (with the chosen thresholds timed on the exit path)."""
  import jax  # pylint: disable=g-import-not-at-top
  from scanformer_jax import (evaluate, exit_calibration,  # pylint: disable=g-import-not-at-top
                              exit_sweep)
  cfg = config.model
  specs = [c.strip() for c in args.exit_criteria.split(",") if c.strip()]
  grids = exit_calibration.calibratable(cfg, specs or None)
  if not grids:
    raise UserError("this model has no threshold criterion to calibrate (train with "
                    "model.halt_head / model.iou_head, or pass --exit-criteria)")
  progress = not args.no_progress
  collect = lambda s: exit_sweep.collect_split(config, run.params, run.mesh,  # noqa: E731
                                               run.param_shardings, s, progress)
  metrics = collect(split)
  result = exit_calibration.calibrate(cfg, metrics, split, grids, args.risk, args.delta,
                                      args.guarantee, args.loss, args.margin, args.p_value)
  result = {"step": run.step, **result}
  held_metrics = metrics
  if args.report_split and args.report_split != split:
    held_metrics = collect(args.report_split)
  chosen = sorted({e["spec"] for e in result["criteria"].values() if e["threshold"] is not None})
  if args.exit_sweep:
    # The curves from the same rows, and the chosen thresholds timed in the sweep's
    # program and passes: each split runs once, the exit path compiles once.
    sweep = exit_sweep.run_sweep(
        config, run.params, run.mesh, run.param_shardings, split, measure=not args.no_timing,
        progress=progress, report_split=args.report_split, collected=(metrics, held_metrics),
        also_time=chosen if args.report_split else ())
    timed_by_sweep = sweep.pop("also_timed", None)
    _write_sweep(args, config, run, split, sweep)
  if args.report_split:
    held = exit_calibration.report(cfg, held_metrics, args.report_split, result)
    if not args.no_timing:
      if args.exit_sweep:
        measured, plain = timed_by_sweep, sweep["plain_eval_samples_per_s"]
        no_exit = (sweep.get("reported") or sweep)["no_exit"]
      else:
        timed = evaluate.first_device_batches(config, args.report_split, run.mesh)
        measured, plain = exit_sweep.measure_exit_path(
            config, run.params, run.mesh, run.param_shardings, timed,
            [*chosen, "last_scale"], held_metrics, paired=chosen, progress=progress)
        no_exit = measured["last_scale"]
      held["plain_eval_samples_per_s"] = plain
      held["no_exit_over_plain"] = no_exit["paired_over_plain"]
      for entry in held["criteria"].values():
        if entry["spec"] in chosen:
          spread = measured[entry["spec"]]["paired_speedup"]
          entry.update(speedup_spread=spread, speedup=spread["median"],
                       realised=spread["median"] / entry["gflops_ratio"],
                       exit_scale_agreement=measured[entry["spec"]]["exit_scale_agreement"])
    result.update(report=held, reported_on=args.report_split)
  if jax.process_index() == 0:
    clean, _ = strict_json(result)
    path = exit_calibration.write(clean, args.workdir)
    print(f"checkpoint step {run.step}")
    print(exit_calibration.format_calibration(result))
    print(f"wrote {path}")
  return 0


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  common.setup_logging(args.verbose)
  if args.exit_criterion:
    args.overrides = [*args.overrides, f"eval.exit_criterion={args.exit_criterion}"]

  def body() -> int:
    common.check_writable(args.json, "--json")
    common.check_writable(args.gallery, "--gallery", directory=True)
    common.check_writable(args.exit_sweep, "--exit-sweep", directory=True)
    config = common.resolve_config(args.config, args.workdir, args.overrides)
    from scanformer_jax import sharding  # pylint: disable=g-import-not-at-top
    sharding.initialize_distributed(config.mesh)
    import jax  # pylint: disable=g-import-not-at-top
    from scanformer_jax import evaluate, workdir  # pylint: disable=g-import-not-at-top
    splits = [s for item in args.split for s in item.split(",") if s] or list(
        config.data.eval_splits)
    _check_gallery_args(args, splits)
    # Registers `calibrated:<name>` and loads this workdir's thresholds, if any.
    from scanformer_jax import exit_calibration  # pylint: disable=g-import-not-at-top
    calibration = exit_calibration.activate(args.workdir)
    run = workdir.load_for_inference(args.workdir, config, args.step, config.mesh)
    if args.exit_calibrate:
      return _exit_calibrate(args, config, run, splits[0])
    if args.exit_sweep:
      return _exit_sweep(args, config, run, splits[0])
    mode, plan_line = eval_plan(args, config)
    reports = evaluate.evaluate_params(config, run.params, run.mesh, run.param_shardings,
                                       splits, progress=not args.no_progress,
                                       mode=mode)
    spec = config.eval.exit_criterion or ""
    if calibration and spec.startswith("calibrated:"):
      entry = calibration["criteria"].get(spec.partition(":")[2], {})
      facts = {k: calibration.get(k) for k in ("split", "count", "eps", "delta", "guarantee",
                                                "loss", "margin", "step")}
      for report in reports.values():
        if "early_exit" in report:
          report["early_exit"]["calibration"] = {**facts, "threshold": entry.get("threshold"),
                                                 "file": calibration["file"]}
    page = None
    if args.gallery and reports[splits[0]].get("count"):
      page = evaluate.write_split_gallery(config, run.params, splits[0], run.mesh,
                                          reports[splits[0]], args.gallery, args.gallery_size,
                                          progress=not args.no_progress,
                                          workdir=args.workdir, step=run.step)
    if jax.process_index() == 0:
      print(f"checkpoint step {run.step}")
      if plan_line:
        print(plan_line)
      for split, report in reports.items():
        print(format_report(split, report))
      hint = next(filter(None, (calibrate_hint(r, config.model, args.workdir)
                                for r in reports.values())), None)
      if hint:
        print(hint)
      if page:
        print(f"gallery: {page}")
      if args.json:
        write_json_report(reports, args.json)
    return 0

  return common.run("scanformer eval", body, args.verbose)
