"""Resume traps: a changed train.num_steps is refused unless --extend, Ctrl-C saves
like SIGTERM, a run that fails before its first checkpoint leaves no config.json, and
train.init_from supplies the tokenizer's vocab.txt."""

import logging
import os
import signal

import pytest

import train_helpers
from scanformer_jax import config_io, trainer
from scanformer_jax.cli import train as train_cmd
from scanformer_jax.errors import UserError


def _config(*overrides):
  config = config_io.load_config_file(train_helpers.FAKE_CONFIG)
  return config_io.apply_overrides(config, list(overrides))


def _saved_steps(workdir):
  path = workdir / "checkpoints"
  return sorted(int(p) for p in os.listdir(path) if p.isdigit()) if path.is_dir() else []


@pytest.mark.slow
def test_changed_num_steps_is_refused_unless_extend(tmp_path, caplog):
  workdir = str(tmp_path / "w")
  trainer.train(_config("train.num_steps=4"), workdir, progress=False)
  with pytest.raises(UserError, match=r"train.num_steps changed from 4 to 6 on a run at "
                     r"step 4: .*recomputed over 6 steps.*--extend"):
    trainer.train(_config("train.num_steps=6"), workdir, progress=False)
  with pytest.raises(UserError, match="at step 4 already"):
    trainer.train(_config("train.num_steps=3"), workdir, progress=False)
  assert config_io.load_json(os.path.join(workdir, "config.json")).train.num_steps == 4
  with caplog.at_level(logging.WARNING):
    result = trainer.train(_config("train.num_steps=6"), workdir, progress=False,
                           extend=True)
  assert result.start_step == 4 and int(result.state.step) == 6
  assert "--extend: train.num_steps 4 -> 6" in caplog.text
  assert config_io.load_json(os.path.join(workdir, "config.json")).train.num_steps == 6
  # The same command again: nothing changed, nothing to do.
  again = trainer.train(_config("train.num_steps=6"), workdir, progress=False)
  assert again.start_step == 6 and int(again.state.step) == 6


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_stops(tmp_path):
  """SIGINT after step 3 (checkpoints every 2): step 3 is saved, exit code 130."""
  workdir = tmp_path / "interrupted"
  proc = train_helpers.run_cli(
      ["train", "--config", train_helpers.FAKE_CONFIG, "--workdir", str(workdir),
       "--no-progress"], extra_env={train_cmd.FAULT_ENV: "INT@3"}, check=False)
  assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-3000:]
  assert "SIGINT: saved a checkpoint at step 3" in proc.stderr
  assert _saved_steps(workdir) == [2, 3]


def test_failure_before_the_first_step_leaves_no_config_json(tmp_path):
  """The dataset is missing: the run fails before training, and a retry with another
  model is not refused by a config.json of a run that never trained."""
  workdir = tmp_path / "w"
  broken = _config("data.dataset=synthetic/tiny", f"data.data_dir={tmp_path / 'none'}")
  with pytest.raises(UserError, match="is not built"):
    trainer.train(broken, str(workdir), progress=False)
  assert not (workdir / "config.json").exists()
  changed = config_io.apply_overrides(broken, ["model.mlp_dim=128"])
  trainer._check_resumed_config(  # pylint: disable=protected-access
      str(workdir / "config.json"), changed)


def test_init_from_supplies_the_vocab(tmp_path):
  vilt = tmp_path / "vilt"
  vilt.mkdir()
  (vilt / "vocab.txt").write_text("[PAD]\n[UNK]\n")
  config = _config(f"train.init_from={vilt}")
  resolved = trainer._with_vocab_from_init(config)  # pylint: disable=protected-access
  assert resolved.data.vocab_path == str(vilt / "vocab.txt")
  explicit = config_io.apply_overrides(config, ["data.vocab_path=/x/vocab.txt"])
  assert trainer._with_vocab_from_init(explicit) == explicit  # pylint: disable=protected-access
