"""The sweep's report on the host: operating points chosen on one split and reported
on another, the speed statistic each line names, and the plot's error bars."""

import importlib.util

import numpy as np
from PIL import Image

import train_helpers
from scanformer_jax import exit_sweep, timing


def run_demo():
  """experiments/run_demo.py as a module (its table rows are plain functions)."""
  spec = importlib.util.spec_from_file_location(
      "run_demo", str(train_helpers.ROOT / "experiments" / "run_demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _point(spec, acc, gflops, exit_scale=1.0, **extra):
  return {"criterion": spec, "acc@0.5": acc, "mean_iou": acc, "mean_exit_scale": exit_scale,
          "exit_histogram": [0, 10], "gflops": gflops, **extra}


def _view(split, accs):
  """A split's sweep points: halt_head at two thresholds, the references."""
  criteria = {
      "halt_head": [_point("halt_head:0.9", accs[0], 1.0), _point("halt_head:0.5", accs[1], 0.5)],
      "last_scale": [_point("last_scale", 0.9, 2.0)],
      "oracle": [_point("oracle:0.5", 0.95, 0.8)]}
  return {"split": split, "count": 10, "no_exit": criteria["last_scale"][0],
          "oracle": criteria["oracle"][0], "criteria": criteria}


def test_points_are_chosen_on_one_split_and_reported_on_the_other(tmp_path):
  # On validation halt_head:0.5 keeps the accuracy; on test it loses it. The choice
  # is validation's, the numbers test's.
  result = {**_view("validation", [0.9, 0.895]), "skipped": {}}
  reported = _view("test", [0.9, 0.7])
  speed = timing.paired_ratios([2.0, 2.2, 1.8], [1.0, 1.0, 1.2])
  no_exit = reported["criteria"]["last_scale"][0]
  no_exit.update(samples_per_s=100.0, paired_over_plain=timing.paired_ratios([1.0] * 3,
                                                                               [1.1] * 3))
  reported["criteria"]["halt_head"][1].update(samples_per_s=190.0, paired_speedup=speed,
                                              paired_no_exit_samples_per_s=95.0)
  reported["criteria"]["halt_head"][0].update(samples_per_s=120.0)
  reported["criteria"]["oracle"][0].update(samples_per_s=150.0)
  result.update(reported=reported, chosen_on="validation", reported_on="test")
  result["operating_points"] = exit_sweep.operating_points(result)
  op = result["operating_points"]["halt_head"]
  assert op["spec"] == "halt_head:0.5" and op["acc@0.5"] == 0.7
  assert op["acc@0.5_where_chosen"] == 0.895
  assert op["chosen_on"] == "validation" and op["reported_on"] == "test"
  assert op["speedup"] == np.median([2.0, 2.2, 1.5]) == speed["median"]
  assert op["speedup_statistic"] == "median of paired ratios"
  assert op["realised"] == op["speedup"] / 4.0  # GFLOPs 2.0 -> 0.5.
  text = exit_sweep.format_sweep(result)
  assert "chosen on validation (10 expressions), reported on test (10)" in text
  assert f"speedup {timing.format_spread(speed)} = median of paired ratios" in text
  assert "0.91x (IQR" in text  # The exit machinery's cost at no exit.
  rows = run_demo().exit_rows(result)
  assert rows[0][0] == "early exit (chosen on validation, reported on test): no exit / oracle"
  assert "speedup 2.00x median of 3 paired ratios (IQR 1.75-2.10" in rows[1][1]
  assert rows[-1][1].startswith("0.91x median of 3 paired ratios")
  path = tmp_path / "sweep.png"
  exit_sweep.plot_sweep(result, str(path))
  with Image.open(path) as image:
    assert image.size[0] > 1000  # Two panels: GFLOPs and measured speedup.


def test_demo_rows_of_a_calibration():
  """The demo's table rows: the chosen threshold's held-out risk with its interval and
  the paired speedup, and the no-exit fallback's message."""
  speed = timing.paired_ratios([2.0, 2.0, 2.0], [1.0, 1.0, 1.0])
  calibration = {
      "split": "validation", "eps": 0.01, "delta": 0.1, "loss": "acc_drop",
      "criteria": {"halt_head": {"threshold": 0.99, "spec": "halt_head:0.99"},
                   "iou_head": {"threshold": None, "spec": "last_scale",
                                "message": "no threshold of iou_head meets ..."}},
      "report": {"split": "test", "no_exit_over_plain": speed, "criteria": {
          "halt_head": {"spec": "halt_head:0.99", "gflops_saved": 0.25, "speedup": 2.0,
                        "speedup_spread": speed, "realised": 1.5,
                        "realised_risk": {"risk": 0.004, "losses": 4, "count": 1000,
                                          "interval": [0.0011, 0.0102]}},
          "iou_head": {"spec": "last_scale"}}}}
  rows = run_demo().calibrated_exit_rows(calibration)
  label, text, target, ok = rows[0]
  assert label == "calibrated exit halt_head (validation -> test)"
  assert text == ("halt_head:0.99: acc_drop 0.0040 (4/1000, 95% CI 0.0011-0.0102), GFLOPs "
                  "saved 25.0%, speedup 2.00x median of 3 paired ratios (IQR 2.00-2.00, "
                  "range 2.00-2.00), realised 1.50")
  assert target == "risk <= 0.01 w.p. 0.9" and ok is True
  assert rows[1][1] == "no threshold of iou_head meets ..." and rows[1][3] is None
  assert rows[2][1].startswith("2.00x median of 3 paired ratios")

