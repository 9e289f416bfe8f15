"""`scanformer` console script: dispatches subcommands to the modules of this package.

Each subcommand is a module with `main(argv) -> int`, imported only when used, so the
CLI starts fast and a subcommand's heavy imports never slow the others. Every
command runs with jax's persistent compilation cache (`compile_cache`). Every
command fails the same way (`common.run`): a `UserError` is one line
`scanformer <cmd>: error: ...` and exit code 2; `--verbose` adds the traceback.
"""

from __future__ import annotations

import importlib
import sys
from importlib import metadata

from scanformer_jax import compile_cache, host_allocator

SUBCOMMANDS = {
    "train": ("train", "Train (resumes an existing workdir)."),
    "eval": ("eval", "Evaluate a workdir's checkpoint."),
    "predict": ("predict", "Box for one image and sentence."),
    "calibrate": ("calibrate", "Calibrate sparse capacities and buckets on a split."),
    "bench": ("bench", "Time compiled sparse vs dense inference."),
    "export": ("export", "Export a trained run as a standalone StableHLO artifact."),
    "serve": ("serve", "Web demo and JSON endpoint for a trained run."),
    "convert-vilt": ("convert_vilt", "Import pretrained ViLT weights."),
    "data": ("data", "Build and inspect datasets."),
}


def version() -> str:
  try:
    return metadata.version("scanformer-jax")
  except metadata.PackageNotFoundError:  # Run from a source tree, not installed.
    return "unknown (not installed)"


def _usage() -> str:
  lines = ["usage: scanformer [--version] <command> [--plugin PATH_OR_MODULE] [options]", "",
           "commands:"]
  lines += [f"  {name:<13} {doc}" for name, (_, doc) in SUBCOMMANDS.items()]
  lines += ["", "Run `scanformer <command> --help` for a command's options. --plugin (any",
            "command, repeatable) imports a file or module that registers criteria, rules,",
            "exit heads or datasets first.",
            "", f"Compilation cache: {compile_cache.HELP}."]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(_usage())
    return 0
  if argv[0] == "--version":
    print(f"scanformer {version()}")
    return 0
  name, rest = argv[0], argv[1:]
  if name not in SUBCOMMANDS:
    print(f"scanformer: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  compile_cache.enable()  # Before the subcommand imports jax: its env vars are read then.
  host_allocator.keep_freed_memory()  # XLA:CPU's per-call buffers reuse their pages.
  from scanformer_jax import plugins  # pylint: disable=g-import-not-at-top
  from scanformer_jax.cli import common  # pylint: disable=g-import-not-at-top
  from scanformer_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    rest, specs = common.take_plugin_args(rest)
    plugins.load_all(specs)
  except UserError as e:
    print(f"scanformer {name}: error: {e}", file=sys.stderr)
    return 2
  common.CLI_PLUGINS[:] = specs
  module = importlib.import_module(f"{__name__}.{SUBCOMMANDS[name][0]}")
  return int(module.main(rest) or 0)


if __name__ == "__main__":
  sys.exit(main())
