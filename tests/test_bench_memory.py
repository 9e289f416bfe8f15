"""`scanformer bench --train --memory`: compiled bytes and saved residuals, as JSON."""

import json

import train_helpers


def _memory(tmp_path, name, *overrides):
  out = tmp_path / f"{name}.json"
  proc = train_helpers.run_cli(
      ["bench", "--train", "--memory", "--model", "tiny", "--batch-size", "4",
       "--set", "train.path=dense", *overrides, "--json", str(out)])
  assert "peak GB" in proc.stdout and "residual GB" in proc.stdout
  return json.loads(out.read_text())


def test_memory_report_and_microbatches_halve_the_residuals(tmp_path):
  one = _memory(tmp_path, "one")
  two = _memory(tmp_path, "two", "train.microbatches=2")
  assert list(one["modes"]) == ["dense"] and two["microbatches"] == 2
  a, b = one["modes"]["dense"], two["modes"]["dense"]
  for entry in (a, b):
    assert entry["peak_bytes"] >= entry["temp_bytes"] > 0
    assert entry["argument_bytes"] > 0 and entry["residual_bytes"] > 0
  # One microbatch of 2 rows is live at a time instead of the 4-row batch (plus a few
  # batch-independent residuals, e.g. the interpolated position embeddings).
  assert 0.5 * a["residual_bytes"] < b["residual_bytes"] < 0.55 * a["residual_bytes"]
  for entry, rows in ((a, 4), (b, 2)):
    assert entry["residual_bytes"] == (entry["residual_bytes_fixed"]
                                       + rows * entry["residual_bytes_per_sample"])
  assert a["residual_bytes_per_sample"] == b["residual_bytes_per_sample"]
  assert "XLA:CPU computes bfloat16 matmuls in float32" in one["note"]


def test_memory_flags_need_train_memory():
  proc = train_helpers.run_cli(["bench", "--memory"], check=False)
  assert proc.returncode == 2 and "--train --memory" in proc.stderr
  proc = train_helpers.run_cli(["bench", "--train", "--memory", "--model", "tiny",
                                "--set", "model.no_such_key=1"], check=False)
  assert proc.returncode == 2 and "unknown config key 'model.no_such_key'" in proc.stderr
