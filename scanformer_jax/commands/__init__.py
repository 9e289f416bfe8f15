"""`scanformer train | eval | predict`: thin argument parsing around the library.

Every command's `main(argv) -> int` goes through `run`, which turns a `UserError`
into one line on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Optional

from scanformer_jax.errors import UserError

# Libraries that log every checkpoint operation at INFO.
_QUIET_LOGGERS = ("absl", "orbax", "jax._src", "grain", "tensorflow_datasets")


def setup_logging(verbose: bool = False) -> None:
  logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                      datefmt="%H:%M:%S")
  for name in _QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
  try:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity("debug" if verbose else "warning")
  except ImportError:
    pass


def run(prog: str, body: Callable[[], int]) -> int:
  try:
    return int(body() or 0)
  except UserError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    return 130


def add_config_args(parser: argparse.ArgumentParser, config_required: bool) -> None:
  parser.add_argument("--config", required=config_required,
                      help="experiment config file (python, get_config())" +
                      ("" if config_required else "; default: <workdir>/config.json"))
  parser.add_argument("--workdir", required=True, help="run directory")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE", help="override a config field, e.g. "
                      "train.num_steps=1000 (repeatable)")
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def resolve_config(config_path: Optional[str], workdir: str, overrides: list[str]):
  """The config file (or the workdir's config.json) with `--set` overrides applied."""
  from scanformer_jax import experiment  # pylint: disable=g-import-not-at-top
  if config_path:
    config = experiment.load_config_file(config_path)
  else:
    config = experiment.load_json(os.path.join(workdir, "config.json"))
  return experiment.apply_overrides(config, overrides)
