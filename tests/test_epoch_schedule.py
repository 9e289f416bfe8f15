"""The benchmark configs count their schedule in epochs: `scanformer train` turns
them into steps from the size of whichever train split `data.*` names."""

import pytest

from data_fixtures import synthetic_data_dir
from data_pipelines import sources
from scanformer_jax import config_io
from scanformer_jax.cli import common
from scanformer_jax.errors import UserError
from train_helpers import ROOT

REFCOCO = str(ROOT / "experiments" / "configs" / "refcoco.py")


def test_refcoco_steps_follow_the_train_split_size(tmp_path_factory, tmp_path):
  data_dir = synthetic_data_dir(tmp_path_factory)
  data = ["data.dataset=synthetic/tiny", f"data.data_dir={data_dir}", "train.init_from=none"]
  size = len(sources.SampleSource("synthetic/tiny", "train", data_dir))
  config = common.resolve_config(REFCOCO, str(tmp_path), data)
  assert (config.train.num_epochs, config.optim.warmup_epochs) == (90, 1)
  assert config.train.num_steps == max(1, 90 * size // 128)
  assert config.optim.warmup_steps == max(1, size // 128)
  doubled = common.resolve_config(REFCOCO, str(tmp_path), data + ["train.batch_size=64"])
  assert doubled.optim.warmup_steps == max(1, size // 64)
  # An explicit step count wins over the epochs.
  given = common.resolve_config(REFCOCO, str(tmp_path), data + ["train.num_steps=7",
                                                                 "optim.warmup_steps=2"])
  assert (given.train.num_steps, given.optim.warmup_steps) == (7, 2)


def test_an_unbuilt_split_is_one_line_and_a_recorded_run_is_not_recounted(tmp_path):
  missing = [f"data.data_dir={tmp_path / 'nothing'}", "train.init_from=none"]
  with pytest.raises(UserError, match=r"^train.num_epochs / optim.warmup_epochs count the "
                     r"train split: .*scanformer data refer") as e:
    common.resolve_config(REFCOCO, str(tmp_path), missing)
  assert "\n" not in str(e.value)
  # A workdir's config.json recorded the steps when the run started: eval / predict /
  # resume read them as they are, with or without the data.
  workdir = tmp_path / "run"
  workdir.mkdir()
  recorded = config_io.apply_overrides(config_io.load_config_file(REFCOCO), missing + [
      "train.num_steps=123", "optim.warmup_steps=4"])
  config_io.save_json(recorded, str(workdir / "config.json"))
  config = common.resolve_config(None, str(workdir), [])
  assert (config.train.num_steps, config.optim.warmup_steps) == (123, 4)
