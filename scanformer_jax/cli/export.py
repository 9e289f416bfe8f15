"""`scanformer export`: a trained run as a standalone StableHLO artifact.

    scanformer export --workdir W --out DIR [--mode sparse|dense]
        [--batch-size N | --polymorphic-batch] [--platforms cpu,cuda]
    python DIR/run_exported.py --image I --text T

`scanformer_jax/export.py` says what DIR holds; DIR/README.md how to serve it.
"""

from __future__ import annotations

import argparse
import json
import sys

from scanformer_jax import compile_cache
from scanformer_jax.cli import common, help_format


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="scanformer export", epilog=compile_cache.HELP + ".",
      description="Export a trained run (jax.export / StableHLO, parameters, tokenizer "
      "and a standalone run_exported.py needing only jax, numpy, tokenizers, Pillow).",
      formatter_class=help_format.DefaultsFormatter)
  common.add_workdir_args(parser)
  parser.add_argument("--out", required=True, metavar="DIR",
                      help="directory to write the artifact into (created)")
  parser.add_argument("--mode", choices=("sparse", "dense"), default=None,
                      help="the scan to export: sparse reads only the selected patches "
                      "(default: the plan `scanformer calibrate` measured faster at the "
                      "batch size, else sparse)")
  batch = parser.add_mutually_exclusive_group()
  batch.add_argument("--batch-size", type=int, default=1,
                     help="fixed batch size of the exported program")
  batch.add_argument("--polymorphic-batch", action="store_true",
                     help="export for any batch size (symbolic batch dimension)")
  parser.add_argument("--platforms", default=None,
                      help="comma-separated platforms to lower for, e.g. cpu,cuda "
                      "(default: this machine's jax backend)")
  parser.add_argument("--step", type=int, help="checkpoint step (default: newest)")
  return parser


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  common.setup_logging(args.verbose)

  def body() -> int:
    from scanformer_jax import export as export_lib  # pylint: disable=g-import-not-at-top
    config = common.resolve_config(args.config, args.workdir, args.overrides)
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()] \
        if args.platforms else None
    mode = args.mode
    if mode is None:  # The plan calibrate recorded (a polymorphic batch: batch 1's).
      from scanformer_jax import capacity  # pylint: disable=g-import-not-at-top
      mode, plan_line = capacity.mode_for(capacity.plans_of(config), args.batch_size or 1)
      if plan_line:
        print(plan_line, file=sys.stderr)
    spec = export_lib.export_run(
        args.workdir, args.out, mode=mode, step=args.step, config=config,
        batch_size=None if args.polymorphic_batch else args.batch_size, platforms=platforms)
    print(json.dumps({"out": args.out, **{k: spec[k] for k in (
        "mode", "batch_size", "platforms", "checkpoint_step")}}))
    return 0

  return common.run("scanformer export", body, args.verbose)
