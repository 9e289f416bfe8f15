"""Exit thresholds with a guarantee: the grid's order, the choice on hand-made rows,
and `scanformer eval --exit-calibrate` / `--exit-criterion calibrated:<name>` on the
shared tiny run (no new training)."""

import json
import shutil

import numpy as np
import pytest

from scanformer_jax import early_exit, exit_calibration, risk_control
from scanformer_jax.cli import eval as eval_cmd
from scanformer_jax.config import ModelConfig
from scanformer_jax.metrics import RecMetrics
from tiny_run import tiny_run


def test_grids_are_ordered_safest_first_without_data():
  grids = {name: exit_calibration.ordered_grid(name) for name in
           ("halt_head", "iou_head", "box_stability", "selection_mass", "box_uncertainty")}
  for name in ("halt_head", "iou_head", "box_stability"):  # Stop when the signal >= t.
    assert grids[name] == sorted(grids[name], reverse=True), name
  for name in ("selection_mass", "box_uncertainty"):  # Stop when the signal <= t.
    assert grids[name] == sorted(grids[name]), name


def _rows(n: int = 300):
  """Full-scan rows of a 3-scale model: the IoU head's confidence `c` per sample; the
  box is right at every scale when c >= 0.8, else only at the last scale."""
  rng = np.random.default_rng(0)
  c = rng.uniform(0, 1, n)
  iou = np.where(c[:, None] >= 0.8, 0.9, np.array([0.1, 0.2, 0.9]))  # [N, 3]
  metrics = RecMetrics((4, 16, 64))
  metrics.add({"iou": iou, "valid": np.ones(n, bool),
               "boxes": np.full((n, 3, 4), 0.5, np.float32),
               "pred_iou": np.repeat(c[:, None], 3, 1), "taken": np.tile([4, 8, 16], (n, 1)),
               "num_dropped": np.zeros((n, 3), np.int32), "text_len": np.full(n, 5),
               "wanted_next": np.zeros((n, 3), np.float32)})
  return metrics


def test_calibration_picks_the_last_safe_threshold_and_falls_back_to_no_exit():
  cfg = ModelConfig.tiny(exit_heads=("iou",))
  metrics = _rows()
  grid = exit_calibration.ordered_grid("iou_head", [0.95, 0.9, 0.8, 0.7, 0.5])
  result = exit_calibration.calibrate(cfg, metrics, "validation", {"iou_head": grid},
                                      eps=0.05, delta=0.1)
  entry = result["criteria"]["iou_head"]
  # Stopping at c >= 0.8 loses nothing; 0.7 loses about 10 % of samples: too many.
  assert entry["spec"] == "iou_head:0.8" and entry["threshold"] == 0.8
  assert entry["risk_hat"][:3] == [0.0, 0.0, 0.0] and entry["risk_hat"][3] > 0.05
  assert entry["exit_histogram"][0] == int((metrics.arrays()["pred_iou"][:, 0] >= 0.8).sum())
  assert result["count"] == 300 and result["split"] == "validation"
  # Too few samples for eps 0.01 at delta 0.1: no exit, and the message says why.
  strict = exit_calibration.calibrate(cfg, _rows(200), "validation", {"iou_head": grid},
                                      eps=0.01, delta=0.1)["criteria"]["iou_head"]
  assert strict["spec"] == "last_scale" and strict["threshold"] is None
  assert strict["message"] == ("no threshold of iou_head meets acc_drop <= 0.01 at delta 0.1 "
                               "on 200 samples; the safest (iou_head:0.95) has 0: no exit "
                               "(even a zero loss needs 230 samples)")
  # Held out: the chosen threshold's realised risk with its binomial interval.
  held = exit_calibration.report(cfg, _rows(100), "test", {
      "loss": "acc_drop", "iou_threshold": 0.5, "criteria": {"iou_head": entry}})
  risk = held["criteria"]["iou_head"]["realised_risk"]
  assert risk["risk"] == 0.0 and risk["interval"] == [0.0, pytest.approx(
      risk_control.clopper_pearson(0, 100)[1])]
  assert 0 < held["criteria"]["iou_head"]["gflops_saved"] < 1
  # Timed on the exit path: the printout names the statistic, the realised share of the
  # GFLOPs saving and the exit machinery's cost when nothing exits.
  spread = {"median": 1.31, "q25": 1.26, "q75": 1.38, "min": 0.76, "max": 1.46, "n": 7}
  overhead = {"median": 0.89, "q25": 0.88, "q75": 0.98, "min": 0.8, "max": 1.02, "n": 7}
  held["criteria"]["iou_head"].update(speedup_spread=spread, realised=0.87)
  printed = exit_calibration.format_calibration(
      {"split": "validation", "count": 1000, "loss": "acc_drop", "eps": 0.01, "delta": 0.1,
       "guarantee": "high-probability", "criteria": {"iou_head": entry},
       "report": {**held, "no_exit_over_plain": overhead}})
  assert ("speedup 1.31x (IQR 1.26-1.38, range 0.76-1.46, 7 pairs) (median of paired "
          "ratios) = 0.87 of the GFLOPs saving") in printed
  assert printed.endswith("exit path at no exit over the plain sparse eval on test: 0.89x "
                          "(IQR 0.88-0.98, range 0.80-1.02, 7 pairs) (median of paired ratios; "
                          "< 1: the exit machinery costs)")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  copy = tmp_path_factory.mktemp("calibrated") / "run"
  shutil.copytree(tiny_run(tmp_path_factory), copy)
  return copy


def test_calibrate_cli_then_run_the_calibrated_criterion(workdir, tmp_path, capsys):
  assert eval_cmd.main(["--workdir", str(workdir), "--no-progress", "--exit-criterion",
                        "calibrated:iou_head"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--exit-calibrate" in err[0], err
  assert eval_cmd.main(["--workdir", str(workdir), "--no-progress", "--exit-calibrate",
                        "--split", "validation", "--report-split", "test", "--risk", "0.5",
                        "--delta", "0.5", "--exit-criteria", "iou_head,box_stability",
                        "--no-timing"]) == 0
  out = capsys.readouterr().out
  saved = json.load(open(workdir / "exit_calibration.json"))
  assert saved["chosen_on"] == "validation" and saved["reported_on"] == "test"
  assert saved["split"] == "validation" and saved["report"]["split"] == "test"
  assert saved["eps"] == 0.5 and saved["delta"] == 0.5 and saved["count"] == 24
  assert set(saved["criteria"]) == {"iou_head", "box_stability"}
  entry = saved["criteria"]["iou_head"]
  assert entry["threshold"] is not None, entry  # Risk 0.5 at n 24: something passes.
  held = saved["report"]["criteria"]["iou_head"]
  assert held["realised_risk"]["count"] == 24 and held["spec"] == entry["spec"]
  assert "speedup_spread" not in held  # --no-timing (the sweep's test times the exit path).
  assert "reported on test" in out and entry["spec"] in out

  report_path = tmp_path / "eval.json"
  assert eval_cmd.main(["--workdir", str(workdir), "--no-progress", "--split", "test",
                        "--exit-criterion", "calibrated:iou_head", "--json",
                        str(report_path)]) == 0
  early = json.load(open(report_path))["test"]["early_exit"]
  assert early["criterion"] == entry["spec"]
  assert early["calibration"]["threshold"] == entry["threshold"]
  assert early["calibration"]["split"] == "validation"
  assert early["gflops"] == pytest.approx(held["gflops"])
  assert f"early exit {entry['spec']}" in capsys.readouterr().out


def test_calibrate_cli_refuses_bad_settings(workdir, capsys):
  for argv, message in (
      (["--exit-calibrate", "--risk", "1.5"], "--risk 1.5 must lie in (0, 1)"),
      (["--risk", "0.1"], "--risk needs --exit-calibrate"),
      (["--exit-calibrate", "--exit-criteria", "oracle"], "oracle has none"),
      (["--exit-calibrate", "--exit-criteria", "halt_head"], "halting head"),
      (["--report-split", "test"], "--report-split needs"),
  ):
    assert eval_cmd.main(["--workdir", str(workdir), "--split", "validation",
                          "--no-progress", *argv]) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], (argv, err)
  early_exit.parse("last_scale")  # The registry is intact.


def test_sweep_and_calibration_in_one_process_share_the_splits_and_the_exit_path(
    workdir, tmp_path, monkeypatch, capsys):
  """`--exit-sweep DIR --exit-calibrate`: each split runs once, the exit path compiles
  once, and the calibrated threshold and the no-exit point are timed in the sweep's
  pairs (the numbers both files report are the same measurement)."""
  from scanformer_jax import exit_sweep
  collected, programs = [], []
  collect, program = exit_sweep.collect_split, exit_sweep.ExitScan
  monkeypatch.setattr(exit_sweep, "collect_split",
                      lambda *a, **k: collected.append(a[4]) or collect(*a, **k))
  monkeypatch.setattr(exit_sweep, "ExitScan", lambda *a: programs.append(1) or program(*a))
  monkeypatch.setattr(exit_sweep, "PAIRED_PASSES", 2)
  out = tmp_path / "sweep"
  assert eval_cmd.main(["--workdir", str(workdir), "--no-progress", "--exit-calibrate",
                        "--exit-sweep", str(out), "--split", "validation", "--report-split",
                        "test", "--risk", "0.5", "--delta", "0.5",
                        "--exit-criteria", "iou_head"]) == 0
  assert collected == ["validation", "test"] and len(programs) == 1
  sweep = json.load(open(out / "exit_sweep.json"))
  saved = json.load(open(workdir / "exit_calibration.json"))
  # The sweep draws every criterion; --exit-criteria names what is calibrated.
  assert {"iou_head", "box_stability", "selection_mass"} <= set(sweep["criteria"])
  assert set(saved["criteria"]) == {"iou_head"} and "also_timed" not in sweep
  assert sweep["reported_on"] == saved["reported_on"] == "test"
  held = saved["report"]["criteria"]["iou_head"]
  assert held["spec"] == saved["criteria"]["iou_head"]["spec"] != "last_scale"
  assert held["speedup_spread"]["n"] == 2 and held["exit_scale_agreement"] == 1.0
  assert saved["report"]["no_exit_over_plain"] == sweep["reported"]["no_exit"][
      "paired_over_plain"]
  printed = capsys.readouterr().out
  assert "operating points" in printed and "reported on test" in printed
