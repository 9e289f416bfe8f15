"""experiments/accelerator_check.py in its CPU smoke mode: one JSON with every field."""

import json

import train_helpers


def test_accelerator_check_smoke(tmp_path):
  out = tmp_path / "check.json"
  train_helpers.run_python(
      "import runpy, sys; sys.argv = ['accelerator_check', '--smoke', '--out', %r]; "
      "runpy.run_path('experiments/accelerator_check.py', run_name='__main__')" % str(out),
      timeout=600)
  report = json.loads(out.read_text())
  assert report["smoke"] and report["backend"] == "cpu" and report["device_kind"]
  assert report["attention"]["float32_xla_max_abs_err"] < 1e-5
  assert report["attention"]["bfloat16_xla_max_abs_err"] < 0.1
  size = report["sizes"]["64"]
  for kind in ("forward", "train"):
    for path in ("dense", "sparse"):
      entry = size[kind][path]
      assert entry["median_ms"] > 0 and entry["samples_per_s"] > 0, (kind, path)
      assert entry["gflops_per_sample"] > 0 and entry["compile_s"] > 0
      assert entry["mfu"] is None  # No peak FLOP/s for a CPU in the table.
      assert entry["compiled_peak_bytes"] > 0
  assert size["train"]["dense"]["gflops_per_sample"] > size["train"]["sparse"]["gflops_per_sample"]


def test_peak_table_matches_device_kinds():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "accelerator_check", train_helpers.ROOT / "experiments" / "accelerator_check.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert module.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert module.peak_flops("TPU v5 lite") == 197e12
  assert module.peak_flops("TPU v5p") == 459e12
  assert module.peak_flops("cpu") is None
