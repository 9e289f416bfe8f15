"""`scanformer calibrate --workdir W [--split S] [--quantile Q] [--step N]`.

Runs the model's own selection (full-capacity sparse scan) over a split and writes
per-scale capacities and capacity buckets into `<workdir>/config.json`
(scanformer_jax/capacity.py says how); eval and predict then use them. Then times
the bucketed sparse plan against the dense one on the split's first samples, at
batch 1 and at eval.batch_size, and records the faster per batch size
(`eval.plans`), which eval and predict follow (`--no-plan-timing`: no timing, the
sparse plan). Also writes `<workdir>/calibration.json` (what was seen, chosen and
measured) and prints it.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os

from scanformer_jax.cli import common


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="scanformer calibrate",
                                   description="Calibrate sparse capacities and buckets.")
  parser.add_argument("--workdir", required=True, help="trained run directory")
  parser.add_argument("--split", default=None,
                      help="split to calibrate on (default: the first of data.eval_splits)")
  parser.add_argument("--quantile", type=float, default=0.995,
                      help="per-scale quantile of wanted patches per sample, in (0, 1] "
                      "(default: %(default)s): the capacity covers this share of samples")
  parser.add_argument("--step", type=int, help="checkpoint step (default: newest)")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE", help="override a config field for this run "
                      "only (e.g. data.data_dir=...); not written back")
  parser.add_argument("--no-plan-timing", action="store_true",
                      help="skip timing the bucketed sparse plan against dense (eval and "
                      "predict then run sparse at every batch size)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  common.add_verbose_arg(parser)
  return parser


def main(argv: list[str]) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if not 0.0 < args.quantile <= 1.0:
    parser.error("--quantile must be in (0, 1]")
  common.setup_logging(args.verbose)

  def body() -> int:
    config = common.resolve_config(None, args.workdir, args.overrides)
    common.check_writable(os.path.join(args.workdir, "config.json"), "--workdir")
    from scanformer_jax import sharding  # pylint: disable=g-import-not-at-top
    sharding.initialize_distributed(config.mesh)
    import jax  # pylint: disable=g-import-not-at-top
    from scanformer_jax import (capacity, data_source, eval_step,  # pylint: disable=g-import-not-at-top
                                workdir)
    from scanformer_jax.errors import UserError  # pylint: disable=g-import-not-at-top
    split = args.split or config.data.eval_splits[0]
    cfg = capacity.full_capacity(config.model)
    config = config.replace(model=cfg)
    run = workdir.load_for_inference(args.workdir, config, args.step, config.mesh)
    step = eval_step.EvalStep(cfg, run.mesh, run.param_shardings)
    counts = capacity.wanted_counts(cfg, run.params, step,
                                    data_source.eval_batches(config, split, run.mesh),
                                    run.mesh)
    if not len(counts):
      raise UserError(f"split {split!r} has no samples to calibrate on; pass --split")
    chosen, buckets = capacity.calibrate(counts, cfg.num_patches, args.quantile)
    facts = {"split": split, "step": run.step,
             **capacity.summary(counts, cfg.num_patches, chosen, buckets, args.quantile)}
    plans = []
    if not args.no_plan_timing:
      calibrated = cfg.replace(capacity=tuple(chosen),
                               capacity_buckets=tuple(tuple(b) for b in buckets))
      batches = itertools.islice(data_source.eval_batches(config, split, run.mesh),
                                 capacity.PLAN_BATCHES)
      plans = capacity.measure_plans(calibrated, run.params, run.mesh, run.param_shardings,
                                     list(batches), progress=logging.getLogger(__name__).info)
      facts["plans"] = [dataclasses.asdict(p) for p in plans]
    if jax.process_index() == 0:
      capacity.write_capacities(workdir.config_path(args.workdir), chosen, buckets, plans)
      with open(capacity.calibration_path(args.workdir), "w") as f:
        json.dump(facts, f, indent=2)
        f.write("\n")
      print(f"calibrated on {split} ({facts['count']} samples, checkpoint step {run.step}): "
            f"wanted mean {[round(x, 1) for x in facts['wanted_mean']]} max "
            f"{facts['wanted_max']} of {list(cfg.num_patches)}")
      print(f"model.capacity = {list(chosen)} (quantile {args.quantile}; overflow "
            f"{facts['overflow_fraction_at_capacity']:.4f} of samples at it)")
      print(f"model.capacity_buckets = {[list(b) for b in buckets]}")
      for plan in plans:
        print(f"recorded {plan.describe()}")
      print(f"wrote {workdir.config_path(args.workdir)} and "
            f"{capacity.calibration_path(args.workdir)}")
    return 0

  return common.run("scanformer calibrate", body, args.verbose)
