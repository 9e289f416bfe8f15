"""A fork's ideas are one file each, loaded with --plugin from outside the package.

One tiny training run uses three example plugins (tests/plugins/: a dataset, a
selection rule for training and inference, a learned exit head with its loss); its
config.json records them, so a later `eval` in a fresh process, from another
directory, imports them again and adds a fourth (a criterion) on its command line.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train_helpers
from scanformer_jax import cli

PLUGINS = Path(__file__).resolve().parent / "plugins"


def _train(workdir: Path, *extra: str) -> int:
  return cli.main([
      "train", "--config", train_helpers.FAKE_CONFIG, "--workdir", str(workdir),
      "--plugin", str(PLUGINS / "dataset_plugin.py"),
      "--plugin", str(PLUGINS / "selection_plugin.py"),
      "--plugin", str(PLUGINS / "exit_head_plugin.py"),
      "--set", "data.dataset=two_squares", "--set", "model.exit_heads=iou_sq",
      "--set", "model.train_select_rule=noiseless", "--set", "model.select_rule=noiseless",
      "--set", "train.num_steps=2", "--set", "checkpoint.every_steps=2", *extra])


@pytest.mark.slow
def test_four_example_plugins_train_and_evaluate_from_outside_the_repo(tmp_path):
  workdir = tmp_path / "run"
  assert _train(workdir) == 0
  recorded = json.loads((workdir / "config.json").read_text())["plugins"]
  assert [Path(p).name for p in recorded] == [
      "dataset_plugin.py", "selection_plugin.py", "exit_head_plugin.py"]
  assert all(os.path.isabs(p) for p in recorded)
  # A fresh process in another directory: config.json brings back the three plugins;
  # the criterion comes on the command line.
  out = tmp_path / "sweep"
  proc = subprocess.run(
      [sys.executable, "-m", "scanformer_jax", "eval", "--workdir", str(workdir),
       "--plugin", str(PLUGINS / "criterion_plugin.py"), "--exit-sweep", str(out),
       "--exit-criteria", "centre_settled:0.02,iou_sq:0.6"],
      cwd=tmp_path, env=train_helpers.subprocess_env(), capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  reports = "".join(p.read_text() for p in out.glob("*.json"))
  assert "centre_settled:0.02" in reports and "iou_sq:0.6" in reports


def test_a_missing_or_failing_plugin_is_one_line(tmp_path, capsys):
  bad = tmp_path / "bad_plugin.py"
  bad.write_text("raise RuntimeError('half-written')\n")
  for spec, words in ((str(tmp_path / "absent.py"), "no such file"),
                      (str(bad), "RuntimeError: half-written"),
                      ("no_such_module_xyz", "no module named")):
    assert cli.main(["eval", "--plugin", spec, "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and spec in err[0] and words in err[0], err


def test_an_unregistered_name_in_the_config_names_the_way_out(tmp_path, capsys):
  assert cli.main(["train", "--config", train_helpers.FAKE_CONFIG, "--workdir",
                   str(tmp_path / "w"), "--set", "model.exit_heads=nope"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "'nope'" in err[0] and "--plugin" in err[0], err
