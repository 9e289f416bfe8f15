"""Early-exit sweep: accuracy vs GFLOPs when the scan stops at the first confident scale.

    python experiments/sweep_early_exit.py --workdir runs/demo_iou \
        --thresholds 0.5,0.6,0.7,0.8,0.9 [--split validation] [--json sweep.json]

Runs the sparse evaluation once (needs a model trained with `model.iou_head=true`),
then applies `early_exit.IouHeadThreshold` at each threshold to the stored per-sample
outputs, so the sweep costs one evaluation. New criteria: implement
`early_exit.ExitCriterion` and add them to `criteria()`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def criteria(thresholds):
  from scanformer_jax import early_exit  # pylint: disable=g-import-not-at-top
  return [early_exit.LastScale()] + [early_exit.IouHeadThreshold(t) for t in thresholds]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--split", default=None, help="default: first of data.eval_splits")
  parser.add_argument("--thresholds", default="0.5,0.6,0.7,0.8,0.9")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()

  from scanformer_jax import (checkpointing, commands, data_source, evaluate, experiment,  # pylint: disable=g-import-not-at-top
                              sharding, train_state, trainer)
  from scanformer_jax.eval_step import EvalStep  # pylint: disable=g-import-not-at-top
  from scanformer_jax.errors import UserError  # pylint: disable=g-import-not-at-top

  def body() -> int:
    config = experiment.load_json(os.path.join(args.workdir, "config.json"))
    cfg = config.model.architecture()
    if not cfg.iou_head:
      raise UserError("this run has no IoU head: train with --set model.iou_head=true")
    split = args.split or config.data.eval_splits[0]
    mesh = sharding.make_mesh(config.mesh)
    abstract = train_state.abstract_params(cfg)
    shardings = sharding.tree_shardings(abstract, mesh, config.mesh)
    ckpt = checkpointing.Checkpointer(trainer.checkpoint_dir(config, args.workdir),
                                      config.checkpoint, read_only=True)
    params, step = ckpt.restore_params(abstract, shardings)
    metrics, _ = evaluate.collect(cfg, params, EvalStep(cfg, mesh, shardings),
                                  data_source.eval_batches(config, split, mesh), mesh,
                                  config.eval.iou_threshold, desc=f"eval {split}")
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    chosen = criteria(thresholds)
    rows = [evaluate.exit_report(cfg, metrics, c) for c in chosen]
    print(f"checkpoint step {step}, split {split}, {metrics.count} expressions")
    print(f"{'criterion':<22}{'acc@0.5':>9}{'mIoU':>8}{'exit scale':>12}{'GFLOPs':>10}")
    for c, r in zip(chosen, rows):
      name = c.name if not hasattr(c, "threshold") else f"{c.name}>={c.threshold:g}"
      print(f"{name:<22}{r['acc@0.5']:>9.4f}{r['mean_iou']:>8.4f}"
            f"{r['mean_exit_scale']:>12.2f}{r['gflops']:>10.4f}")
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"split": split, "step": step, "rows": rows}, f, indent=2)
    return 0

  return commands.run("sweep_early_exit", body)


if __name__ == "__main__":
  sys.exit(main())
