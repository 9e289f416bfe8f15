"""A tiny trained run on the real synthetic pipeline, shared by the inference tests.

Built once per test session (per xdist worker) under the session's base temp dir:
synthetic/tiny (64 px images, 24 validation expressions) and 2 training steps of the
fake_tiny_config model with the IoU head, so predictions carry `pred_iou`. The
weights are near their initialization; the tests check plumbing, not accuracy.
"""

from __future__ import annotations

from pathlib import Path

import train_helpers
from data_fixtures import synthetic_data_dir

STEPS = 2


def tiny_run(tmp_path_factory) -> Path:
  """The workdir of the tiny run (trained on first use)."""
  workdir = tmp_path_factory.getbasetemp() / "tiny_inference_run"
  if (workdir / "config.json").is_file() and (workdir / "checkpoints" / str(STEPS)).is_dir():
    return workdir
  from scanformer_jax import config_io, trainer  # pylint: disable=g-import-not-at-top
  data_dir = synthetic_data_dir(tmp_path_factory)
  config = config_io.load_config_file(train_helpers.FAKE_CONFIG)
  config = config_io.apply_overrides(config, [
      "data.dataset=synthetic/tiny", f"data.data_dir={data_dir}", "data.augment=false",
      f"train.num_steps={STEPS}", f"checkpoint.every_steps={STEPS}", "model.exit_heads=iou",
      "eval.batch_size=8", "train.log_every=1"])
  trainer.train(config, str(workdir), progress=False)
  return workdir
