"""Every flag of export, serve and calibrate says what it does; defaults are shown."""

import argparse

import pytest

from scanformer_jax.cli import calibrate, export, serve


@pytest.mark.parametrize("module", [export, serve, calibrate], ids=lambda m: m.__name__)
def test_every_flag_has_help(module):
  parser = module._parser()  # pylint: disable=protected-access
  for action in parser._actions:  # pylint: disable=protected-access
    if not isinstance(action, argparse._HelpAction):  # pylint: disable=protected-access
      assert action.help, f"{module.__name__}: {action.option_strings} has no help"


def test_defaults_are_shown(capsys):
  for module, shown in ((calibrate, "default: 0.995"), (serve, "default: 7860"),
                        (export, "default: the plan `scanformer calibrate` measured faster "
                                 "at the batch size, else sparse")):
    with pytest.raises(SystemExit):
      module._parser().parse_args(["--help"])  # pylint: disable=protected-access
    out = " ".join(capsys.readouterr().out.split())
    assert shown in out, module.__name__
    if module is not calibrate:
      assert "SCANFORMER_NO_CACHE=1" in out
