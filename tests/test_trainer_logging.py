"""What a training run tells its user: a compile message, eval lines per split, and
the same metric names (train/..., eval/<split>/..., per-scale lists as _s<k>) in
metrics.jsonl and TensorBoard."""

import json
import logging

import pytest

import train_helpers
from scanformer_jax import config_io, trainer


@pytest.mark.slow
def test_training_logs_eval_lines_and_one_name_per_metric(tmp_path, capsys, caplog):
  config = config_io.apply_overrides(
      config_io.load_config_file(train_helpers.FAKE_CONFIG),
      ["train.num_steps=3", "eval.every_steps=3", "checkpoint.every_steps=3"])
  workdir = tmp_path / "w"
  with caplog.at_level(logging.INFO):
    trainer.train(config, str(workdir), progress=False)
  assert "compiling the train step" in caplog.text
  out = capsys.readouterr().out
  eval_lines = [l for l in out.splitlines() if l.startswith("eval step 3 validation:")]
  assert len(eval_lines) == 1, out
  assert "acc@0.5 " in eval_lines[0] and "per scale" in eval_lines[0]
  assert "ex/s" in out  # Log lines carry examples/s next to steps/s.

  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  train = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3]
  assert "train/examples_per_s" in train[-1] and "train/steps_per_s" in train[-1]
  assert train[-1]["train/examples_per_s"] == pytest.approx(
      train[-1]["train/steps_per_s"] * config.train.batch_size)
  (evals,) = [r for r in records if any(k.startswith("eval/") for k in r)]
  for key in ("acc_0.5", "mean_iou", "acc_0.5_per_scale_s0", "acc_0.5_per_scale_s1",
              "keep_ratio_s0", "keep_ratio_s1"):
    assert f"eval/validation/{key}" in evals, sorted(evals)

  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
  events.Reload()
  tags = set(events.Tags()["scalars"])
  numeric = {k for r in records for k, v in r.items()
             if k != "step" and isinstance(v, (int, float))}
  assert tags == numeric, (tags ^ numeric)


def test_eval_line_shows_the_per_group_accuracy():
  """A synthetic split's report carries a dict per expression group (not a number)."""
  report = {"acc@0.5": 0.5, "acc@0.5_per_scale": [0.25, 0.5], "mean_iou": 0.4,
            "acc@0.5_by_group": {"colour-only": {"acc@0.5": 0.9, "count": 10},
                                 "shape-only": {"acc@0.5": 0.3, "count": 4}}}
  line = trainer._eval_line(900, "validation", report)  # pylint: disable=protected-access
  assert "acc@0.5 0.5000" in line and "(colour-only 0.900, shape-only 0.300)" in line
