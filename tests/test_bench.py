"""bench.py: keep counts, the benchmark config, and one end-to-end `scanformer bench`."""

import json

import pytest

from scanformer_jax import bench, cli, flops
from scanformer_jax.cli import bench as bench_cmd


def test_keep_counts_and_config():
  assert bench.keep_counts((16, 64, 256), 0.25) == (16, 16, 64)
  assert bench.keep_counts((4, 16, 64), 0.1) == (4, 2, 6)
  assert bench.keep_counts((4, 16, 64), 0.01) == (4, 1, 1)  # at least one patch
  cfg = bench.bench_config("vilt_b32", 0.25, "bfloat16")
  assert cfg.capacity == cfg.select_topk == (16, 16, 64)
  assert cfg.dtype == "bfloat16" and cfg.hidden_size == 768


def test_parse_args_rejects_bad_ratio():
  with pytest.raises(SystemExit):
    bench_cmd.parse_args(["--keep-ratio", "0"])


@pytest.mark.slow
def test_bench_cli_end_to_end(tmp_path, capsys):
  path = tmp_path / "bench.json"
  assert cli.main(["bench", "--model", "tiny", "--batch-size", "2", "--keep-ratio", "0.25",
                   "--steps", "2", "--warmup", "1", "--json", str(path)]) == 0
  report = json.loads(path.read_text())
  assert "speedup" in capsys.readouterr().out
  cfg = bench.bench_config("tiny", 0.25, "float32")
  assert report["kept_per_scale"] == [4, 4, 16]
  # Every sample took exactly the kept count at each scale, nothing dropped.
  assert report["mean_taken_per_scale"] == [4.0, 4.0, 16.0]
  assert report["num_dropped"] == 0
  for mode, expect in (("dense", flops.dense_flops(cfg, 24)), ("sparse", flops.sparse_flops(cfg, 24))):
    result = report["modes"][mode]
    assert result["gflops_per_sample"] == pytest.approx(expect / 1e9)
    assert len(result["step_ms"]) == 2 and result["median_ms"] > 0 and result["compile_s"] > 0
    assert result["samples_per_s"] == pytest.approx(2e3 / result["median_ms"])
  assert report["flops_ratio"] == pytest.approx(flops.dense_flops(cfg, 24) / flops.sparse_flops(cfg, 24))
