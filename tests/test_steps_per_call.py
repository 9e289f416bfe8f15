"""Several optimizer steps per compiled call (`train.steps_per_call`): the trainer's
K-step calls give the updates, metrics and checkpoints of single steps."""

import json

import jax
import numpy as np
import pytest

import train_helpers
from scanformer_jax import config_io, trainer
from scanformer_jax.errors import UserError


def _train(tmp_path, name, overrides):
  config = config_io.apply_overrides(
      config_io.load_config_file(train_helpers.FAKE_CONFIG),
      ["train.num_steps=4", "train.log_every=2", "checkpoint.every_steps=2",
       "train.select_warmup_steps=2", *overrides])
  workdir = tmp_path / name
  result = trainer.train(config, str(workdir), progress=False)
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  return result.state, records


def test_two_steps_per_call_equal_two_single_steps(tmp_path):
  """Warm-up program then main program, prefetched stacked batches: bit-equal."""
  single, single_log = _train(tmp_path, "single", [])
  double, double_log = _train(tmp_path, "double", ["train.steps_per_call=2"])
  assert int(double.step) == int(single.step) == 4
  for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(double.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(single.opt_state), jax.tree.leaves(double.opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The logged steps and their metrics (the last step of each call) are the same.
  assert [r["step"] for r in double_log] == [r["step"] for r in single_log] == [2, 4]
  assert double_log[-1]["train/loss"] == single_log[-1]["train/loss"]


def test_boundaries_must_be_whole_calls(tmp_path):
  with pytest.raises(UserError, match=r"steps_per_call=3 .*train\.num_steps=4.*"
                     r"train\.log_every=2"):
    _train(tmp_path, "bad", ["train.steps_per_call=3"])
