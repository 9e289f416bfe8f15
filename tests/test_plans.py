"""Never slower than dense: `calibrate` records the faster plan per batch size, and
`eval`, `predict` and `load()` follow it and say so. The timings are injected (no
timed assertion): what is tested is the recording and the following."""

import argparse
import json
import shutil

import pytest

import scanformer_jax
from scanformer_jax import capacity, compile_cache, config_io, forward
from scanformer_jax.cli import calibrate as calibrate_cmd, eval as eval_cmd
from scanformer_jax.cli import predict as predict_cmd
from scanformer_jax.config import ExperimentConfig
from scanformer_jax.errors import UserError
from tiny_run import tiny_run
from visualize_fixtures import noise

EVAL_BATCH = 8  # tiny_run's eval.batch_size
# Seconds to get each batch-1 program ready that the fake `ready_seconds` reports.
READY = {"sparse": 1.4, "dense": 0.35}
# Seconds per forward the fake timer reports: dense faster at batch 1, sparse at batch 8.
TIMES = {1: {"sparse": [0.0266, 0.0270, 0.0262], "dense": [0.0093, 0.0095, 0.0091]},
         EVAL_BATCH: {"sparse": [0.010, 0.011, 0.009], "dense": [0.020, 0.021, 0.019]}}


def test_plan_for_takes_the_nearest_batch_size():
  plans = [capacity.Plan(1, "dense", 26.6, 9.3), capacity.Plan(64, "sparse", 10.0, 20.0)]
  assert capacity.plan_for([], 4) is None
  assert [capacity.plan_for(plans, b).batch_size for b in (1, 2, 7, 8, 9, 64, 512)] == [
      1, 1, 1, 1, 64, 64, 64]  # 8 is as near 1 as 64 (log2): the smaller
  assert plans[0].describe() == ("plan: dense (bucketed sparse measured 26.6 ms vs dense "
                                 "9.3 ms at batch 1)")


def test_choose_plan_by_median_and_keeps_sparse_on_a_tie():
  assert capacity.choose_plan(1, TIMES[1]) == capacity.Plan(1, "dense", 26.6, 9.3)
  assert capacity.choose_plan(8, TIMES[8]).mode == "sparse"
  assert capacity.choose_plan(8, {"sparse": [0.01], "dense": [0.01]}).mode == "sparse"
  assert capacity.choose_plan(1, TIMES[1], calls=2).sparse_ms == 13.3  # per forward


def test_few_forwards_take_the_plan_that_is_ready_sooner():
  plan = capacity.Plan(1, "sparse", 2.2, 3.4, sparse_ready_s=1.4, dense_ready_s=0.35)
  assert plan.mode_for(None) == "sparse"  # Unknown count (a server): per forward.
  assert plan.mode_for(1) == "dense"  # 1.4022 s against 0.3534 s
  assert plan.mode_for(874) == "dense" and plan.mode_for(876) == "sparse"  # even at 875
  assert capacity.Plan(1, "sparse", 2.2, 3.4).mode_for(1) == "sparse"  # not measured
  assert plan.describe(1) == (
      "plan: dense (bucketed sparse measured 2.2 ms vs dense 3.4 ms at batch 1; for 1 "
      "forward the program's start decides: sparse ready in 1.40 s vs dense 0.35 s)")
  assert plan.describe() == ("plan: sparse (bucketed sparse measured 2.2 ms vs dense "
                             "3.4 ms at batch 1)")
  assert capacity.Plan(*plan.as_tuple()) == plan
  assert capacity.mode_for([plan], 1, calls=1)[0] == "dense"


def test_ready_seconds_times_the_compile_of_each_lowering():
  import jax  # pylint: disable=g-import-not-at-top
  lowered = []

  def lower(n):
    def make():
      lowered.append(n)
      return jax.jit(lambda x: x * n).lower(1.0)
    return make
  ready = capacity.ready_seconds({"sparse": lower(2.0), "dense": lower(3.0)})
  assert sorted(ready) == ["dense", "sparse"] and all(t > 0 for t in ready.values())
  assert lowered == [2.0, 3.0] * capacity.READY_ROUNDS  # alternating, a fresh one each


def test_recalibration_replaces_the_plans_and_bad_entries_are_one_line(tmp_path):
  path = str(tmp_path / "config.json")
  config_io.save_json(ExperimentConfig(), path)
  capacity.write_capacities(path, (16, 32, 64), ((16,), (32, 64), (64, 256)),
                            [capacity.Plan(64, "sparse", 1.0, 2.0),
                             capacity.Plan(1, "dense", 3.0, 2.0)])
  config = config_io.load_json(path)
  assert config.eval.plans == ((1, "dense", 3.0, 2.0), (64, "sparse", 1.0, 2.0))
  assert capacity.plans_of(config)[0] == capacity.Plan(1, "dense", 3.0, 2.0)
  capacity.write_capacities(path, (16, 32, 64), ((16,), (32, 64), (64, 256)))
  assert config_io.load_json(path).eval.plans == ()  # timed other buckets: dropped
  bad = config_io.apply_overrides(config, ["eval.plans=((1, 'fast', 1.0, 2.0),)"])
  with pytest.raises(UserError, match=r"eval.plans\[0\].*rerun `scanformer calibrate`"):
    capacity.plans_of(bad)


def test_eval_plan_explicit_mode_wins():
  config = config_io.apply_overrides(ExperimentConfig(), [
      "eval.batch_size=8", "eval.plans=((1, 'sparse', 1.0, 2.0), (8, 'dense', 3.0, 2.0))"])
  assert eval_cmd.eval_plan(argparse.Namespace(mode=None), config) == (
      "dense", "plan: dense (bucketed sparse measured 3.0 ms vs dense 2.0 ms at batch 8)")
  assert eval_cmd.eval_plan(argparse.Namespace(mode="sparse"), config) == ("sparse", None)
  assert eval_cmd.eval_plan(argparse.Namespace(mode=None), ExperimentConfig()) == (
      "sparse", None)


def test_calibrate_hint_only_for_an_uncalibrated_sparse_eval_above_dense():
  cfg = ExperimentConfig().model
  report = {"mode": "sparse", "count": 10, "gflops_as_run": 0.119, "gflops_dense": 0.114}
  hint = eval_cmd.calibrate_hint(report, cfg, "runs/x")
  assert hint.startswith("hint: the uncalibrated sparse path ran 0.119 GFLOPs per sample, "
                         "more than dense (0.114)")
  assert "scanformer calibrate --workdir runs/x" in hint and "\n" not in hint
  assert eval_cmd.calibrate_hint({**report, "gflops_as_run": 0.1}, cfg, "runs/x") is None
  assert eval_cmd.calibrate_hint({**report, "mode": "dense"}, cfg, "runs/x") is None
  calibrated = cfg.replace(capacity=cfg.num_patches)
  assert eval_cmd.calibrate_hint(report, calibrated, "runs/x") is None


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
  """A copy of the tiny run, calibrated with the fake timings (TIMES)."""
  run = tmp_path_factory.mktemp("plans") / "run"
  shutil.copytree(tiny_run(tmp_path_factory), run)
  seen = []

  def fake_timer(batch_size, runs):  # seconds per pass: several forwards each
    seen.append((batch_size, sorted(runs)))
    calls = capacity.SINGLE_SAMPLES if batch_size == 1 else capacity.PLAN_BATCHES
    return {mode: [t * calls for t in times] for mode, times in TIMES[batch_size].items()}

  with pytest.MonkeyPatch.context() as m:
    m.setattr(capacity, "paired_timer", fake_timer)
    m.setattr(capacity, "ready_seconds", lambda lowerings: (
        seen.append(("ready", sorted(lowerings))), READY)[1])
    assert calibrate_cmd.main(["--workdir", str(run), "--split", "validation",
                               "--no-progress"]) == 0
  assert seen == [(1, ["dense", "sparse"]), ("ready", ["dense", "sparse"]),
                  (EVAL_BATCH, ["dense", "sparse"])]
  return run


def test_calibrate_records_the_faster_plan_per_batch_size(calibrated_run):
  config = config_io.load_json(str(calibrated_run / "config.json"))
  assert config.eval.plans == ((1, "dense", 26.6, 9.3, 1.4, 0.35),
                               (EVAL_BATCH, "sparse", 10.0, 20.0))
  assert config.model.capacity_buckets is not None
  facts = json.loads((calibrated_run / "calibration.json").read_text())
  assert [p["mode"] for p in facts["plans"]] == ["dense", "sparse"]


def test_eval_follows_the_plan_and_says_which_ran(calibrated_run, tmp_path, capsys):
  out = tmp_path / "eval.json"
  assert eval_cmd.main(["--workdir", str(calibrated_run), "--split", "validation", "--json",
                        str(out), "--no-progress", "--set",
                        "eval.plans=((8, 'dense', 10.0, 5.0),)"]) == 0
  printed = capsys.readouterr().out
  assert "plan: dense (bucketed sparse measured 10.0 ms vs dense 5.0 ms at batch 8)" in printed
  assert json.loads(out.read_text())["validation"]["mode"] == "dense"
  assert "hint:" not in printed


def _record_modes_and_image(tmp_path, monkeypatch) -> tuple[list[str], str]:
  """(the modes every forward traced runs, recorded as they trace; an image path), with
  the program cache in tmp_path."""
  monkeypatch.setattr(compile_cache, "programs_dir", lambda: str(tmp_path / "programs"))
  modes = []
  rows = forward.rows
  monkeypatch.setattr(forward, "rows", lambda cfg, params, batch, mode="sparse", **kw: (
      modes.append(mode), rows(cfg, params, batch, mode, **kw))[1])
  image = tmp_path / "a.png"
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(noise(50, 70, seed=2)).save(image)
  return modes, str(image)


def test_predict_and_load_follow_the_plan(calibrated_run, tmp_path, monkeypatch, capsys):
  modes, image = _record_modes_and_image(tmp_path, monkeypatch)
  assert predict_cmd.main(["--workdir", str(calibrated_run), "--image", image, "--text",
                           "the red square"]) == 0
  captured = capsys.readouterr()
  assert "plan: dense (bucketed sparse measured 26.6 ms vs dense 9.3 ms at batch 1)" in (
      captured.err)
  assert json.loads(captured.out)["box"] and modes == ["dense"]
  predictor = scanformer_jax.load(calibrated_run, batch_size=8)
  assert [predictor.mode(b) for b in (1, 2, 4, 8)] == ["dense", "dense", "sparse", "sparse"]
  assert predictor.describe_plan(8).startswith("plan: sparse (")


def test_predict_of_one_image_takes_the_plan_ready_sooner(calibrated_run, tmp_path,
                                                          monkeypatch, capsys):
  """Bucketed sparse faster per forward but slower to get ready: one image's predict runs
  dense and says why; `load()` with no forward count keeps the faster per forward."""
  modes, image = _record_modes_and_image(tmp_path, monkeypatch)
  plans = "eval.plans=((1, 'sparse', 2.2, 3.4, 1.4, 0.35),)"
  assert predict_cmd.main(["--workdir", str(calibrated_run), "--image", image, "--text",
                           "the red square", "--set", plans]) == 0
  assert "for 1 forward the program's start decides" in capsys.readouterr().err
  assert modes == ["dense"]
  config = config_io.apply_overrides(config_io.load_json(
      str(calibrated_run / "config.json")), [plans])
  assert scanformer_jax.load(calibrated_run, config=config).mode(1) == "sparse"
  assert scanformer_jax.load(calibrated_run, config=config, calls=1).mode(1) == "dense"


def test_export_follows_the_plan_of_its_batch_size(calibrated_run, tmp_path, capsys):
  from scanformer_jax import cli  # pylint: disable=g-import-not-at-top
  out = tmp_path / "export"
  assert cli.main(["export", "--workdir", str(calibrated_run), "--out", str(out)]) == 0
  captured = capsys.readouterr()
  assert json.loads(captured.out)["mode"] == "dense"  # batch 1's plan
  assert "plan: dense (bucketed sparse measured 26.6 ms" in captured.err
  assert json.loads((out / "export.json").read_text())["mode"] == "dense"
