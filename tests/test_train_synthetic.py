"""End to end on the real synthetic dataset and grain pipeline: a short training run
lowers the loss clearly; `eval --json` writes the documented report; `predict`
prints a box in original pixels and writes the scan picture."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import train_helpers
from scanformer_jax import config_io, trainer
from scanformer_jax.cli import eval as eval_cmd
from scanformer_jax.cli import predict as predict_cmd

STEPS = 60
REPORT_KEYS = {"acc@0.5", "acc@0.5_per_scale", "mean_iou", "keep_ratio", "num_dropped",
               "gflops_kept", "gflops_as_run", "gflops_dense", "samples_per_s",
               "model_samples_per_s", "count",
               "overflow_fraction", "patches_dropped", "capacity_used", "mode"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  from data_pipelines import synthetic_builder
  data_dir = tmp_path_factory.mktemp("data")
  synthetic_builder.build(str(data_dir), "tiny")  # 48 / 24 / 24 expressions, 64 px
  config = config_io.load_config_file(train_helpers.FAKE_CONFIG)
  config = config_io.apply_overrides(config, [
      "data.dataset=synthetic/tiny", f"data.data_dir={data_dir}",
      f"train.num_steps={STEPS}", "checkpoint.every_steps=30",
      "model.initializer_range=0.15", "optim.warmup_steps=5", "data.augment=false", "optim.backbone_learning_rate=3e-3"])
  workdir = tmp_path_factory.mktemp("run")
  trainer.train(config, str(workdir), progress=False)
  return config, workdir


@pytest.mark.slow
def test_short_training_lowers_the_loss(trained):
  _, workdir = trained
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  losses = np.array([r["train/loss"] for r in records])
  # Per-step losses are noisy (8 samples, Gumbel selection): compare the untrained
  # start (warmup, ~zero learning rate) with the mean of the last 10 steps.
  first, last = losses[:3].mean(), losses[-10:].mean()
  assert last < 0.75 * first, (first, last)
  for key in ("l1", "giou", "ratio", "lr", "keep_s1", "skipped"):
    assert f"train/{key}" in records[-1]
  assert records[-1]["train/skipped"] == 0
  assert os.listdir(workdir / "tensorboard")  # Event files written too.


@pytest.mark.slow
def test_eval_json_report(trained, tmp_path, capsys):
  _, workdir = trained
  path = tmp_path / "eval.json"
  assert eval_cmd.main(["--workdir", str(workdir), "--json", str(path), "--no-progress",
                        "--split", "validation,test"]) == 0
  reports = json.load(open(path))
  assert set(reports) == {"validation", "test"}
  for report in reports.values():
    assert REPORT_KEYS <= set(report)
    assert report["count"] == 24  # Every expression of the split, once.
    assert len(report["acc@0.5_per_scale"]) == len(report["keep_ratio"]) == 2
    # Every synthetic expression falls in one group; the groups' hits add up.
    groups = report["acc@0.5_by_group"]
    assert sum(g["count"] for g in groups.values()) == report["count"]
    hits = sum(g["acc@0.5"] * g["count"] for g in groups.values())
    assert hits == pytest.approx(report["acc@0.5"] * report["count"])
  out = capsys.readouterr().out
  assert "acc@0.5" in out and "acc@0.5 by expression:" in out


@pytest.mark.slow
def test_predict_prints_box_and_writes_scan_picture(trained, tmp_path, capsys):
  from data_pipelines import synthetic
  scene = synthetic.make_scene(0, "test", 0, synthetic.SceneConfig(image_size=96))
  image_path, out_path = tmp_path / "scene.png", tmp_path / "boxes.png"
  Image.fromarray(scene.image).crop((0, 0, 96, 80)).save(image_path)  # Not square.
  _, workdir = trained
  rc = predict_cmd.main(["--workdir", str(workdir), "--image", str(image_path), "--text",
                         scene.expressions[0].text, "--out", str(out_path)])
  assert rc == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  x0, y0, x1, y1 = result["box"]
  assert 0 <= x0 <= x1 <= 96 and 0 <= y0 <= y1 <= 80
  assert len(result["boxes_per_scale"]) == 2 and result["boxes_per_scale"][-1] == result["box"]
  assert result["image_size"] == [80, 96]
  # The scan picture: the input (scaled to the panel size) beside its rebuild.
  from scanformer_jax.visualize.scan_picture import display_factor
  pw, ph = round(96 * display_factor(80, 96)), round(80 * display_factor(80, 96))
  width, height = Image.open(out_path).size
  assert width > 2 * pw and height > ph
  assert result["truncated"] is False and result["out"] == str(out_path)


def test_predict_user_errors(trained, tmp_path, capsys):
  _, workdir = trained
  rc = predict_cmd.main(["--workdir", str(workdir), "--image", str(tmp_path / "nope.png"),
                         "--text", "the red circle"])
  assert rc == 2
  err = capsys.readouterr().err
  assert "image not found" in err and "Traceback" not in err


@pytest.mark.slow
def test_eval_exit_sweep_writes_the_curve(trained, tmp_path, capsys):
  """`eval --exit-sweep DIR`: JSON and PNG, and the real exit path agrees with the
  after-the-fact criterion on every sample (exit scale and accuracy)."""
  _, workdir = trained
  out = tmp_path / "sweep"
  assert eval_cmd.main(["--workdir", str(workdir), "--split", "validation", "--no-progress",
                        "--exit-sweep", str(out), "--exit-criteria",
                        "box_stability:0.5,box_stability:0.95,selection_mass:0.3"]) == 0
  result = json.load(open(out / "exit_sweep.json"))
  assert set(result["criteria"]) == {"box_stability", "selection_mass", "last_scale", "oracle"}
  for points in result["criteria"].values():
    for p in points:
      assert p["exit_scale_agreement"] == 1.0 and p["forced_exits"] == 0, p
      assert sum(p["exit_histogram"]) == result["count"] == p["checked_samples"] == 24
      assert p["acc@0.5_exit_path"] == p["acc@0.5"] and p["samples_per_s"] > 0
  no_exit, oracle = result["no_exit"], result["oracle"]
  assert no_exit["mean_exit_scale"] == 1.0 and oracle["acc@0.5"] >= no_exit["acc@0.5"]
  with Image.open(out / "exit_sweep.png") as image:
    assert image.size[0] > 600
  assert "operating points" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_exit_sweep_refuses_a_criterion_the_model_cannot_run(trained, tmp_path, capsys):
  _, workdir = trained
  assert eval_cmd.main(["--workdir", str(workdir), "--split", "validation", "--no-progress",
                        "--exit-sweep", str(tmp_path), "--exit-criteria", "iou_head:0.7"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "needs the 'iou' exit head" in err[0] and "model.exit_heads" in err[0], err
