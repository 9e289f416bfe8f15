"""Early-exit sweep: accuracy vs GFLOPs when the scan stops where a criterion says.

    python experiments/sweep_early_exit.py --workdir runs/demo_iou \
        --thresholds 0.5,0.6,0.7,0.8,0.9 [--criteria NAME[:ARG],...] \
        [--split validation] [--json sweep.json]

Runs the sparse evaluation once, then applies every criterion to the stored
per-sample outputs, so the sweep costs one evaluation. The criteria come from the
registry in scanformer_jax/early_exit.py: by default `last_scale` plus `iou_head` at
each of `--thresholds` (needs a model trained with `model.iou_head=true`); `--criteria`
names any registered ones instead. A new criterion registered there shows up here
(`--list` prints the names) without editing this script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def criterion_specs(criteria: str, thresholds: str) -> list[str]:
  """`--criteria` as given, else last_scale plus iou_head at each threshold."""
  if criteria:
    return [c.strip() for c in criteria.split(",") if c.strip()]
  return ["last_scale"] + [f"iou_head:{t.strip()}" for t in thresholds.split(",") if t.strip()]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir")
  parser.add_argument("--split", default=None, help="default: first of data.eval_splits")
  parser.add_argument("--thresholds", default="0.5,0.6,0.7,0.8,0.9")
  parser.add_argument("--criteria", default="",
                      help="comma-separated registry specs, e.g. last_scale,iou_head:0.7")
  parser.add_argument("--list", action="store_true", help="print the registered criteria")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()

  from scanformer_jax import data_source, early_exit, evaluate, workdir  # pylint: disable=g-import-not-at-top
  from scanformer_jax.cli import common  # pylint: disable=g-import-not-at-top
  from scanformer_jax.eval_step import EvalStep  # pylint: disable=g-import-not-at-top

  if args.list:
    print("\n".join(early_exit.names()))
    return 0
  if not args.workdir:
    parser.error("--workdir is required")

  def body() -> int:
    config = workdir.load_config(args.workdir)
    cfg = config.model
    # A criterion this model cannot run (iou_head without model.iou_head) fails here.
    chosen = [evaluate.parse_criterion(spec, cfg)
              for spec in criterion_specs(args.criteria, args.thresholds)]
    split = args.split or config.data.eval_splits[0]
    run = workdir.load_for_inference(args.workdir, config, mesh_config=config.mesh)
    metrics, _ = evaluate.collect(cfg, run.params,
                                  EvalStep(cfg, run.mesh, run.param_shardings),
                                  data_source.eval_batches(config, split, run.mesh), run.mesh,
                                  config.eval.iou_threshold, desc=f"eval {split}")
    rows = [evaluate.exit_report(cfg, metrics, c) for c in chosen]
    print(f"checkpoint step {run.step}, split {split}, {metrics.count} expressions")
    print(f"{'criterion':<22}{'acc@0.5':>9}{'mIoU':>8}{'exit scale':>12}{'GFLOPs':>10}")
    for c, r in zip(chosen, rows):
      print(f"{c.spec:<22}{r['acc@0.5']:>9.4f}{r['mean_iou']:>8.4f}"
            f"{r['mean_exit_scale']:>12.2f}{r['gflops']:>10.4f}")
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"split": split, "step": run.step, "rows": rows}, f, indent=2)
    return 0

  return common.run("sweep_early_exit", body)


if __name__ == "__main__":
  sys.exit(main())
