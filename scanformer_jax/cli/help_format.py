"""An argparse help formatter that shows a flag's default where one is worth showing."""

from __future__ import annotations

import argparse


class DefaultsFormatter(argparse.HelpFormatter):
  """Appends "(default: X)" unless the help names its default already or X is empty
  (None, False, []): `--port ... (default: 7860)`, not `--step ... (default: None)`."""

  def _get_help_string(self, action: argparse.Action) -> str:
    text = action.help or ""
    if ("default" in text or action.default in (None, False, [], argparse.SUPPRESS)
        or not action.option_strings):
      return text
    return text + " (default: %(default)s)"
