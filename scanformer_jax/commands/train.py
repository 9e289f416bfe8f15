"""`scanformer train --config PATH --workdir W [--set key=value ...]`.

Starts a run, or resumes it when W already holds checkpoints (same command). Without
--config, resumes with W/config.json.
"""

from __future__ import annotations

import argparse

from scanformer_jax import commands


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="scanformer train", description="Train ScanFormer; resumes an existing workdir.")
  commands.add_config_args(parser, config_required=False)
  parser.add_argument("--no-progress", action="store_true",
                      help="log lines instead of a progress bar")
  return parser


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  commands.setup_logging(args.verbose)

  def body() -> int:
    config = commands.resolve_config(args.config, args.workdir, args.overrides)
    from scanformer_jax import sharding  # pylint: disable=g-import-not-at-top
    sharding.initialize_distributed(config.mesh)  # Before anything touches devices.
    from scanformer_jax import trainer  # pylint: disable=g-import-not-at-top
    result = trainer.train(config, args.workdir, progress=not args.no_progress)
    if result.stopped_early:
      return 143  # Like a process ended by SIGTERM; the checkpoint is saved.
    return 0

  return commands.run("scanformer train", body)
