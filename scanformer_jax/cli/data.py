"""`scanformer data ...`: the dataset commands of data_pipelines/cli.py, on the common
error path (a `UserError` its own handling lets through is one line and exit 2)."""

from __future__ import annotations

from scanformer_jax.cli import common


def main(argv: list[str]) -> int:
  from data_pipelines import cli as data_cli  # pylint: disable=g-import-not-at-top
  return common.run("scanformer data", lambda: data_cli.main(argv))
