"""A run whose every step is non-finite stops after train.max_consecutive_skipped
steps with one line, and saves nothing."""

import os

import pytest

import train_helpers
from scanformer_jax import config_io, trainer
from scanformer_jax.errors import UserError


@pytest.mark.slow
def test_diverged_run_stops_without_saving(tmp_path):
  config = config_io.apply_overrides(
      config_io.load_config_file(train_helpers.FAKE_CONFIG),
      # 1e39 is finite in the config but overflows float32: every loss is inf.
      ["loss.l1_weight=1e39", "train.max_consecutive_skipped=2", "train.num_steps=6",
       "checkpoint.every_steps=2"])
  workdir = tmp_path / "w"
  with pytest.raises(UserError, match=r"training diverged: steps 1-2 all had a non-finite "
                     r"loss or gradient \(train.max_consecutive_skipped=2\); stopped "
                     r"without saving") as info:
    trainer.train(config, str(workdir), progress=False)
  assert "\n" not in str(info.value)
  checkpoints = workdir / "checkpoints"
  assert not checkpoints.exists() or not [p for p in os.listdir(checkpoints) if p.isdigit()]
  assert not (workdir / "config.json").exists()
