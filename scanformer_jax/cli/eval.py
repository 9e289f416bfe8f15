"""`scanformer eval --workdir W [--config PATH] [--split S ...] [--mode M] [--json PATH]`.

Evaluates the newest readable checkpoint of W (or `--step N`) with the sparse path
(`--mode dense`: the dense path, to measure what sparsity saves) on each split
(default: the config's `data.eval_splits`) and prints one line per split;
`--json` writes `{split: report}` (see scanformer_jax/evaluate.py for the keys);
`--gallery DIR` writes the split's HTML gallery (scanformer_jax/visualize/gallery.py);
`--exit-sweep DIR` writes early-exit curves instead (scanformer_jax/exit_sweep.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

from scanformer_jax.cli import common
from scanformer_jax.errors import UserError


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="scanformer eval",
                                   description="Evaluate a workdir's checkpoint.")
  common.add_workdir_args(parser)
  parser.add_argument("--split", action="append", default=[],
                      help="split to evaluate (repeatable or comma-separated); "
                      "default: data.eval_splits")
  parser.add_argument("--json", metavar="PATH", help="write the reports here")
  parser.add_argument("--step", type=int, help="checkpoint step (default: newest)")
  parser.add_argument("--mode", choices=("sparse", "dense"), default="sparse",
                      help="scan path (default sparse; dense runs every patch)")
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
                      "at every threshold of its grid")
  return parser


def _check_gallery_args(args, splits: list[str]) -> None:
  if args.exit_sweep and len(splits) != 1:
    raise UserError(f"--exit-sweep sweeps one split, got {', '.join(splits)}: add --split NAME")
  if args.exit_sweep and (args.gallery or args.mode != "sparse"):
    raise UserError("--exit-sweep runs alone: drop --gallery / --mode")
  if args.exit_criteria and not args.exit_sweep:
    raise UserError("--exit-criteria needs --exit-sweep DIR")
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
          f"n={r['count']}")


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
  import jax  # pylint: disable=g-import-not-at-top
  from scanformer_jax import exit_sweep  # pylint: disable=g-import-not-at-top
  specs = [c.strip() for c in args.exit_criteria.split(",") if c.strip()]
  result = exit_sweep.run_sweep(config, run.params, run.mesh, run.param_shardings, split,
                                specs or None, progress=not args.no_progress)
  result = {"step": run.step, **result}
  if jax.process_index() == 0:
    clean, _ = strict_json(result)
    json_path, png_path = exit_sweep.write_sweep(
        clean, args.exit_sweep, f"early exit: {config.data.dataset} {split}, step {run.step}")
    print(f"checkpoint step {run.step}, split {split}, {result['count']} expressions")
    print(exit_sweep.format_sweep(result))
    print(f"wrote {json_path} and {png_path}")
  return 0


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  common.setup_logging(args.verbose)

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
    run = workdir.load_for_inference(args.workdir, config, args.step, config.mesh)
    if args.exit_sweep:
      return _exit_sweep(args, config, run, splits[0])
    reports = evaluate.evaluate_params(config, run.params, run.mesh, run.param_shardings,
                                       splits, progress=not args.no_progress,
                                       mode=args.mode)
    page = None
    if args.gallery and reports[splits[0]].get("count"):
      page = evaluate.write_split_gallery(config, run.params, splits[0], run.mesh,
                                          reports[splits[0]], args.gallery, args.gallery_size,
                                          progress=not args.no_progress)
    if jax.process_index() == 0:
      print(f"checkpoint step {run.step}")
      for split, report in reports.items():
        print(format_report(split, report))
      if page:
        print(f"gallery: {page}")
      if args.json:
        write_json_report(reports, args.json)
    return 0

  return common.run("scanformer eval", body, args.verbose)
