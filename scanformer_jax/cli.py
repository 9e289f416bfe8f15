"""`scanformer` console script: dispatches subcommands to the modules that own them.

Each subcommand is `module:function(argv) -> int`, imported only when used, so the
CLI starts fast and a subcommand's heavy imports never slow the others.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "bench": ("scanformer_jax.bench", "Time compiled sparse vs dense inference."),
    "data": ("data_pipelines.cli", "Build and inspect datasets."),
    "train": ("scanformer_jax.commands.train", "Train (resumes an existing workdir)."),
    "eval": ("scanformer_jax.commands.evaluate", "Evaluate a workdir's checkpoint."),
    "predict": ("scanformer_jax.commands.predict", "Box for one image and sentence."),
    "convert-vilt": ("scanformer_jax.convert_vilt", "Import pretrained ViLT weights."),
}


def _usage() -> str:
  lines = ["usage: scanformer <command> [options]", "", "commands:"]
  lines += [f"  {name:<13} {doc}" for name, (_, doc) in SUBCOMMANDS.items()]
  lines += ["", "Run `scanformer <command> --help` for a command's options."]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(_usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in SUBCOMMANDS:
    print(f"scanformer: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  module = importlib.import_module(SUBCOMMANDS[name][0])
  return int(module.main(rest) or 0)


if __name__ == "__main__":
  sys.exit(main())
