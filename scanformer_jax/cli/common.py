"""What every `scanformer` command shares: logging, the workdir flags, the error path."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import tempfile
import traceback
from typing import Callable, Optional

from scanformer_jax.errors import UserError

# Libraries that log every checkpoint operation at INFO.
_QUIET_LOGGERS = ("jax._src", "grain", "tensorflow_datasets")
# Libraries whose warnings are internal detail around our own messages (orbax, through
# absl, warns on every read-only restore; asyncio prints the tracebacks of tasks that an
# error abandoned): errors only, unless --verbose.
_SILENT_LOGGERS = ("absl", "orbax", "asyncio")


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _quiet_unraisable(unraisable) -> None:
  """Exceptions Python cannot raise (in __del__, at shutdown): one debug log line."""
  logging.getLogger(__name__).debug("ignored %s in %r", unraisable.exc_type.__name__,
                                    unraisable.object)


def setup_logging(verbose: bool = False) -> None:
  """INFO (DEBUG with `verbose`) to stderr; chatty libraries at WARNING.

  The root level is set explicitly: a library imported earlier may already have
  configured the root logger (importing checkpointing, i.e. orbax, leaves it at
  WARNING), which would hide our INFO lines. Existing handlers are kept.
  """
  level = logging.DEBUG if verbose else logging.INFO
  logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                      datefmt="%H:%M:%S")
  logging.getLogger().setLevel(level)
  for name in _QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
  for name in _SILENT_LOGGERS:
    logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.CRITICAL)
  if not verbose:
    sys.unraisablehook = _quiet_unraisable
  try:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity("debug" if verbose else "fatal")
  except ImportError:
    pass


def run(prog: str, body: Callable[[], int], verbose: bool = False) -> int:
  """Runs a command's body: a `UserError` becomes one line on stderr and exit code 2.

  So does a full disk (or quota) met anywhere: the machine's state, not a bug. With
  `verbose` the traceback is printed first. Any other exception is a bug and
  propagates with its traceback.
  """
  try:
    return int(body() or 0)
  except UserError as e:
    if verbose:
      traceback.print_exc(file=sys.stderr)
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    if e.errno not in _DISK_FULL:
      raise
    if verbose:
      traceback.print_exc(file=sys.stderr)
    where = f"writing {e.filename}" if e.filename else "writing a file"
    print(f"{prog}: error: {e.strerror} ({where}): free space on that disk (the "
          "workdir's or the output's) and rerun the same command", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    return 130


# Plugins named with --plugin on the command line (`scanformer` loads them before the
# subcommand runs; `resolve_config` records them in the run's config).
CLI_PLUGINS: list[str] = []


def take_plugin_args(argv: list[str]) -> tuple[list[str], list[str]]:
  """(argv without `--plugin X` / `--plugin=X`, the plugin specs), in order."""
  rest, specs = [], []
  args = iter(argv)
  for arg in args:
    if arg == "--plugin":
      spec = next(args, None)
      if spec is None:
        raise UserError("--plugin needs a python file or module name")
      specs.append(spec)
    elif arg.startswith("--plugin="):
      specs.append(arg.partition("=")[2])
    else:
      rest.append(arg)
  return rest, specs


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
  """--verbose, and --plugin (documented here; `scanformer` consumes it first)."""
  parser.add_argument("-v", "--verbose", action="store_true",
                      help="debug logging; tracebacks for errors")
  parser.add_argument("--plugin", metavar="PATH_OR_MODULE", action="append", default=[],
                      help="a python file or module to import first: it registers exit "
                           "criteria, selection rules, exit heads or datasets (repeatable; "
                           "a training run records it in config.json)")


def add_workdir_args(parser: argparse.ArgumentParser, config_required: bool = False) -> None:
  """--workdir, --config, --set, --verbose: the flags of train, eval and predict."""
  parser.add_argument("--config", required=config_required,
                      help="experiment config file (python, get_config())" +
                      ("" if config_required else "; default: <workdir>/config.json"))
  parser.add_argument("--workdir", required=True, help="run directory")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE", help="override a config field, e.g. "
                      "train.num_steps=1000 (repeatable)")
  add_verbose_arg(parser)


def resolve_config(config_path: Optional[str], workdir: str, overrides: list[str]):
  """The config file (or the workdir's config.json) with `--set` overrides applied,
  its vocab path relocated to the workdir's own copy when the recorded one is gone."""
  from scanformer_jax import config_io, workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from scanformer_jax import plugins  # pylint: disable=g-import-not-at-top
  if config_path:
    config = config_io.load_config_file(config_path)
  else:
    config = workdir_lib.load_config(workdir)
  if CLI_PLUGINS:
    named = tuple(plugins.resolve(spec) for spec in CLI_PLUGINS)
    config = config.replace(plugins=tuple(dict.fromkeys(config.plugins + named)))
  config = with_converted_shape(config_io.apply_overrides(config, overrides), overrides)
  config = with_epoch_schedule(config, overrides, from_file=bool(config_path))
  return workdir_lib.relocated(config, workdir)


def _override_keys(overrides: list[str]) -> set[str]:
  """The config keys `--set key=value` items name."""
  return {item.partition("=")[0].strip() for item in overrides}


def train_split_size(config) -> int:
  """Expressions in the built train split of `data.dataset` (a UserError naming the
  build command when it is not built, or when the dataset cannot say)."""
  from data_pipelines import sources  # pylint: disable=g-import-not-at-top
  from scanformer_jax import data_source  # pylint: disable=g-import-not-at-top
  data = config.data
  try:
    return len(sources.SampleSource(data.dataset, data.train_split,
                                    data_source.data_dir(config)))
  except UserError as e:
    raise UserError(f"train.num_epochs / optim.warmup_epochs count the train split: {e}"
                    ) from None


def with_epoch_schedule(config, overrides: list[str], from_file: bool = True):
  """`train.num_epochs` and `optim.warmup_epochs` as steps of the train split's size
  (`train_split_size`): set from the config file (`from_file`) or a --set; an explicit
  --set train.num_steps / optim.warmup_steps is kept. A resumed run reads the steps
  its config.json recorded."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  train, optim = config.train, config.optim
  given = _override_keys(overrides)
  wanted = {"train.num_steps": train.num_epochs, "optim.warmup_steps": optim.warmup_epochs}
  wanted = {key: epochs for key, epochs in wanted.items()
            if epochs is not None and key not in given}
  asked = from_file or {"train.num_epochs", "optim.warmup_epochs"} & given
  from scanformer_jax.config import INIT_FROM_REQUIRED  # pylint: disable=g-import-not-at-top
  if not wanted or not asked or train.init_from == INIT_FROM_REQUIRED:
    return config  # (The last: training refuses until init_from is chosen; say that first.)
  size = train_split_size(config)
  steps = {key: max(1, int(epochs * size // train.batch_size)) for key, epochs in wanted.items()}
  if "train.num_steps" in steps:
    train = dataclasses.replace(train, num_steps=steps["train.num_steps"])
  if "optim.warmup_steps" in steps:
    optim = dataclasses.replace(optim, warmup_steps=steps["optim.warmup_steps"])
  logging.getLogger(__name__).info(
      "%s from %d train expressions of %s", ", ".join(f"{k}={v}" for k, v in steps.items()),
      size, config.data.dataset)
  return config.replace(train=train, optim=optim)


def with_converted_shape(config, overrides: list[str]):
  """`train.init_from` names a `scanformer convert-vilt` directory: the backbone shape
  its config.json records (hidden size, layers, heads, MLP, patch, position grid,
  text length, vocab, ...) fills `model`, so a converted ViLT of any size needs no
  `--set model.*`. Encoder1 follows when the layer count changes. A `--set model.X`
  is never replaced: one that differs from the converted value is a UserError (its
  weights could not load), one line naming both values.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  from scanformer_jax import config_io  # pylint: disable=g-import-not-at-top
  from scanformer_jax.config import INIT_FROM_REQUIRED  # pylint: disable=g-import-not-at-top
  init = config.train.init_from
  if not init or init == INIT_FROM_REQUIRED:
    return config
  path = os.path.join(os.path.expanduser(init), "config.json")
  if not os.path.isfile(path):
    return config  # Not converted yet (or moved): the trainer names what is missing.
  from scanformer_jax.vilt import BACKBONE_FIELDS  # pylint: disable=g-import-not-at-top
  try:
    with open(path, encoding="utf-8") as f:
      converted = config_io.model_config_from_dict(json.load(f), path)
  except (OSError, ValueError) as e:
    raise UserError(f"train.init_from={init}: cannot read its {path} ({e}); convert the "
                    "weights again with `scanformer convert-vilt`") from None
  given = _override_keys(overrides)
  model, changes = config.model, {}
  for name in BACKBONE_FIELDS:
    ours, theirs = getattr(model, name), getattr(converted, name)
    if ours == theirs:
      continue
    if f"model.{name}" in given:
      raise UserError(f"--set model.{name}={ours!r} conflicts with the converted ViLT in "
                      f"{init} (model.{name}={theirs!r}): its weights would not load; drop "
                      "the --set (the converted shape is used) or convert a ViLT of that "
                      "shape")
    changes[name] = theirs
  if ("num_layers" in changes and "model.encoder1_layers" not in given
      and model.encoder1_layers != converted.encoder1_layers):
    changes["encoder1_layers"] = converted.encoder1_layers
  if not changes:
    return config
  try:
    model = dataclasses.replace(model, **changes)
  except ValueError as e:
    raise UserError(f"the converted ViLT in {init} does not fit this config: {e}") from None
  logging.getLogger(__name__).info(
      "model shape from train.init_from=%s: %s", init,
      ", ".join(f"{k}={v!r}" for k, v in changes.items()))
  return config.replace(model=model)


def check_writable(path: Optional[str], flag: str, directory: bool = False) -> None:
  """A UserError now, before any work, unless `path` (a file; with `directory`, a
  folder) can be written: every output flag is checked this way up front, so a
  typo costs no evaluation. Missing parent folders are fine (they are created when
  the output is written); nothing is left behind.
  """
  if not path:
    return
  target = os.path.abspath(path)
  if os.path.isdir(target):
    if not directory:
      raise UserError(f"{flag} {path} is a directory: give a file name")
    folder = target
  elif os.path.exists(target) and directory:
    raise UserError(f"{flag} {path} is a file, not a directory: give a folder")
  else:
    folder = os.path.dirname(target)
    while not os.path.lexists(folder):
      folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
      raise UserError(f"{flag} {path}: {folder} is a file, not a directory")
    if os.path.exists(target) and not os.access(target, os.W_OK):
      raise UserError(f"{flag} {path} is not writable: choose another path")
  try:  # Permissions, read-only file systems, ...: what a real write would meet.
    fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise UserError(f"{flag} {path}: cannot write in {folder} ({e.strerror or e}); "
                    "choose a writable path") from None
