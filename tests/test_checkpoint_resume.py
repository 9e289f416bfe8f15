"""Exact resume: a run SIGKILLed between checkpoints or in the middle of a save and
rerun with the same command ends with exactly the parameters of an uninterrupted run;
a corrupt newest checkpoint falls back to the previous one with a warning, and
training moves it aside and saves that step again; SIGTERM saves and stops."""

import logging
import os
import shutil
import signal

import numpy as np
import pytest

import train_helpers
from scanformer_jax.cli import train as train_cmd
from scanformer_jax.errors import UserError


def _train(workdir, extra_env=None, check=True, steps=6):
  return train_helpers.run_cli(
      ["train", "--config", train_helpers.FAKE_CONFIG, "--workdir", str(workdir),
       "--no-progress", "--set", f"train.num_steps={steps}"], extra_env=extra_env,
      check=check)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  _train(workdir)
  return workdir


@pytest.mark.slow
def test_sigkill_then_rerun_matches_uninterrupted(uninterrupted, tmp_path):
  workdir = tmp_path / "killed"
  # Checkpoints every 2 steps; die right after step 5 (step 4 is the last saved).
  proc = _train(workdir, extra_env={train_cmd.FAULT_ENV: "KILL@5"}, check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  steps = sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
  assert steps[-1] == 4, steps

  proc = _train(workdir)  # The same command again: resumes from step 4.
  assert "resumed from step 4" in proc.stderr

  a = train_helpers.load_final_params(str(uninterrupted))
  b = train_helpers.load_final_params(str(workdir))
  assert a["step"] == b["step"] == 6
  assert train_helpers.max_abs_diff(a["params"], b["params"]) == 0.0


def _step_names(workdir):
  return sorted(os.listdir(workdir / "checkpoints"))


@pytest.mark.slow
def test_sigkill_during_a_save_then_rerun_matches_uninterrupted(uninterrupted, tmp_path):
  workdir = tmp_path / "killed_in_save"
  # Dies while step 4's checkpoint is written (arrays down, directory not renamed).
  proc = _train(workdir, extra_env={train_cmd.FAULT_ENV: "KILL@save:4"}, check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  names = _step_names(workdir)
  assert "2" in names and "4" not in names, names
  assert any(n.startswith("4.orbax-checkpoint-tmp") for n in names), names

  proc = _train(workdir)  # Resumes from the last complete checkpoint.
  assert "resumed from step 2" in proc.stderr
  a = train_helpers.load_final_params(str(uninterrupted))
  b = train_helpers.load_final_params(str(workdir))
  assert a["step"] == b["step"] == 6
  assert train_helpers.max_abs_diff(a["params"], b["params"]) == 0.0


@pytest.mark.slow
def test_corrupt_latest_is_retrained_and_saved_again(uninterrupted, tmp_path):
  workdir = tmp_path / "corrupt_rerun"
  shutil.copytree(uninterrupted, workdir)
  shutil.rmtree(workdir / "checkpoints" / "6" / "params")
  proc = _train(workdir)
  assert "resumed from step 4" in proc.stderr
  assert "moved checkpoint step 6 aside" in proc.stderr
  names = _step_names(workdir)
  assert "6" in names and any(n.startswith("6.corrupt-") for n in names), names
  a = train_helpers.load_final_params(str(uninterrupted))
  b = train_helpers.load_final_params(str(workdir))
  assert a["step"] == b["step"] == 6
  assert train_helpers.max_abs_diff(a["params"], b["params"]) == 0.0
  proc = _train(workdir)  # The next rerun finds step 6 and has nothing to redo.
  assert "resumed from step 6" in proc.stderr and "could not be restored" not in proc.stderr


def _corrupt(step_dir):
  """Overwrites every data file of a checkpoint's params with garbage."""
  hit = 0
  for root, _, files in os.walk(os.path.join(step_dir, "params")):
    for name in files:
      if name.endswith(".json"):
        continue
      with open(os.path.join(root, name), "r+b") as f:
        size = max(os.path.getsize(f.name), 1)
        f.write(b"\x00garbage" * (size // 8 + 1))
      hit += 1
  assert hit, f"no data files under {step_dir}"


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back(uninterrupted, tmp_path, caplog):
  workdir = tmp_path / "corrupt"
  shutil.copytree(uninterrupted, workdir)
  _corrupt(workdir / "checkpoints" / "6")
  with caplog.at_level(logging.WARNING):
    restored = train_helpers.load_final_params(str(workdir))
  assert restored["step"] == 4
  assert "could not be restored" in caplog.text

  # Resuming training takes the same fallback (and then redoes steps 5-6).
  from scanformer_jax import (checkpointing, config_io, data_source, optim, sharding,
                              train_state)
  from scanformer_jax.config import MeshConfig
  import jax
  config = config_io.load_json(str(workdir / "config.json"))
  cfg = config.model
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)
  ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"), read_only=True)
  state = ckpt.restore_latest(train_state.abstract_state(cfg, tx),
                              train_state.state_shardings(cfg, tx, mesh, config.mesh),
                              data_source.train_iterator(config, mesh))
  assert int(state.step) == 4

  # Nothing restorable (e.g. another config's checkpoints): a clear user error.
  _corrupt(workdir / "checkpoints" / "4")
  _corrupt(workdir / "checkpoints" / "2")
  with pytest.raises(UserError, match="could be restored"):
    ckpt.restore_latest(train_state.abstract_state(cfg, tx),
                        train_state.state_shardings(cfg, tx, mesh, config.mesh),
                        data_source.train_iterator(config, mesh))


@pytest.mark.slow
def test_sigterm_saves_and_stops(uninterrupted, tmp_path):
  """A real SIGTERM (sent by the process to itself after step 3, i.e. mid-run) saves a
  checkpoint at that step and exits 143; rerunning finishes exactly like the rest."""
  workdir = tmp_path / "preempted"
  proc = _train(workdir, extra_env={train_cmd.FAULT_ENV: "TERM@3"}, check=False)
  assert proc.returncode == 143, proc.stderr[-3000:]
  assert "SIGTERM" in proc.stderr
  steps = sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
  assert steps == [2, 3], steps  # Every 2 steps, plus the preemption save.
  _train(workdir)
  a = train_helpers.load_final_params(str(uninterrupted))
  b = train_helpers.load_final_params(str(workdir))
  assert train_helpers.max_abs_diff(a["params"], b["params"]) == 0.0


def _allocated_bytes(path) -> int:
  """Bytes a tmpfs charges for the files under `path` (whole 4 KiB pages)."""
  total = 0
  for root, _, files in os.walk(path):
    total += sum(-(-os.path.getsize(os.path.join(root, f)) // 4096) * 4096 for f in files)
  return total


@pytest.mark.slow
def test_disk_full_during_training_is_one_line_and_keeps_checkpoints(uninterrupted,
                                                                     tmp_path):
  """A workdir on a tmpfs with room for about one and a half checkpoints."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  one_checkpoint = _allocated_bytes(uninterrupted / "checkpoints" / "2")
  rest = _allocated_bytes(uninterrupted) - _allocated_bytes(uninterrupted / "checkpoints")
  workdir = tmp_path / "full"
  workdir.mkdir()
  size = rest + 64 * 1024 + one_checkpoint * 3 // 2
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                            str(workdir)], capture_output=True, text=True, check=False)
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); "
                "tests/test_checkpointing.py covers the message with a patched writer")
  try:
    proc = _train(workdir, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    # orbax and asyncio also log the failed writes; the command's answer is one line.
    errors = [l for l in proc.stderr.splitlines() if l.startswith("scanformer train: error: ")]
    assert len(errors) == 1 and str(workdir) in errors[0], proc.stderr[-3000:]
    assert "no space left" in errors[0] or "cannot write" in errors[0], errors[0]
    assert train_helpers.load_final_params(str(workdir))["step"] == 2  # Kept intact.
    with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
      assert all(json.loads(line) for line in f)  # Every line parses.
  finally:
    subprocess.run(["umount", "-l", str(workdir)], check=False)
