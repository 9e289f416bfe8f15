"""Resume guards of the trainer on the tiny fake config: divergence never reaches the
checkpoints, a changed optimizer-state structure or architecture is refused in one
line (nothing moved aside), checkpoints moved aside never restart a run silently, and
a checkpoint directory belongs to one workdir."""

import os
import shutil

import jax
import numpy as np
import pytest

import train_helpers
from scanformer_jax import config_io, trainer, workdir_lock
from scanformer_jax.errors import UserError


def _config(*overrides):
  config = config_io.load_config_file(train_helpers.FAKE_CONFIG)
  return config_io.apply_overrides(config, list(overrides))


def _entries(workdir):
  return sorted(os.listdir(workdir / "checkpoints"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir trained 4 steps (checkpoints 2 and 4)."""
  workdir = tmp_path_factory.mktemp("trained") / "w"
  trainer.train(_config("train.num_steps=4"), str(workdir), progress=False)
  return workdir


@pytest.mark.slow
def test_divergence_keeps_the_last_good_checkpoint(trained, tmp_path):
  """A huge learning rate: finite but enormous parameters, then non-finite steps.
  Nothing of it is saved, the error names the step a rerun resumes from, and that
  rerun (with a sane learning rate) trains on from it."""
  workdir = tmp_path / "w"
  shutil.copytree(trained, workdir)
  with pytest.raises(UserError, match=r"training diverged: .*not saved|training diverged: "
                     r".*stopped without saving") as info:
    trainer.train(_config("train.num_steps=12", "optim.learning_rate=1e30",
                          "optim.backbone_learning_rate=1e30",
                          "train.max_consecutive_skipped=3"),
                  str(workdir), progress=False, extend=True)
  assert "a rerun resumes from step 4" in str(info.value) and "\n" not in str(info.value)
  assert _entries(workdir) == ["2", "4", "scanformer_run.json"]
  result = trainer.train(_config("train.num_steps=6"), str(workdir), progress=False,
                         extend=True)
  assert result.start_step == 4 and int(result.state.step) == 6
  assert int(result.state.skipped) == 0
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(result.state.params))


def test_changed_optimizer_state_is_refused_in_one_line(trained, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(trained, workdir)
  before = _entries(workdir)
  with pytest.raises(UserError, match=r"optim.grad_clip_norm 1.0 -> 0.0 changes the "
                     r"optimizer state .*--reset-optimizer") as info:
    trainer.train(_config("train.num_steps=4", "optim.grad_clip_norm=0"), str(workdir),
                  progress=False)
  assert "\n" not in str(info.value)
  assert _entries(workdir) == before  # Nothing moved aside.
  result = trainer.train(_config("train.num_steps=4", "optim.grad_clip_norm=0"),
                         str(workdir), progress=False, reset_optimizer=True)
  assert result.start_step == 4  # Parameters and progress restored...
  counts = [int(x) for p, x in jax.tree_util.tree_flatten_with_path(
      result.state.opt_state)[0] if "count" in jax.tree_util.keystr(p)]
  assert counts and not any(counts)  # ...and a fresh optimizer state.
  assert _entries(workdir) == before


def test_architecture_change_is_refused_unless_allowed(trained, caplog):
  """model.num_heads 2 -> 4 keeps every parameter shape but is another network."""
  path = str(trained / "config.json")
  changed = _config("train.num_steps=4", "model.num_heads=4")
  with pytest.raises(UserError, match=r"another architecture \(model.num_heads 2 -> 4\).*"
                     r"--allow-model-change"):
    trainer._check_resumed_config(path, changed)  # pylint: disable=protected-access
  trainer._check_resumed_config(  # pylint: disable=protected-access
      path, changed, allow_model_change=True)
  assert "resuming anyway" in caplog.text


def test_checkpoints_moved_aside_never_restart_silently(trained, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(trained, workdir)
  for name in ("2", "4"):
    os.rename(workdir / "checkpoints" / name,
              workdir / "checkpoints" / f"{name}.corrupt-20261207T000000")
  with pytest.raises(UserError, match=r"no readable checkpoint .* 2 were moved aside .*"
                     r"--from-scratch"):
    trainer.train(_config("train.num_steps=4"), str(workdir), progress=False)


def test_a_checkpoint_directory_serves_one_workdir(trained, tmp_path):
  shared = f"checkpoint.directory={trained / 'checkpoints'}"
  with pytest.raises(UserError, match=f"belongs to the run in workdir {trained}"):
    trainer.train(_config("train.num_steps=4", shared), str(tmp_path / "other"),
                  progress=False)
  busy = tmp_path / "busy"
  with workdir_lock.WorkdirLock(str(busy)):
    with pytest.raises(UserError, match="in use by another run .*use another "
                       "checkpoint.directory"):
      trainer.train(_config("train.num_steps=4", f"checkpoint.directory={busy}"),
                    str(tmp_path / "third"), progress=False)
