"""Wall-clock of compiled sparse vs dense inference, random weights (`scanformer bench`).

With `--keep-ratio R` every sample takes exactly round(R * G_s^2) patches at each
scale s >= 1 (the top parent logits among its candidates, `select_topk`), and the
sparse capacities are set to those counts, so an untrained model is measured at a
chosen sparsity. Both modes are compiled once, warmed up, then timed alternately
(dense step, sparse step, ...) so that background load hits both alike; each step
ends with `block_until_ready`, and the median of `--steps` is reported with the
analytic FLOPs per sample (scanformer_jax.flops) and their ratios. The median
process CPU time per batch (all threads) is reported too: on a shared machine it
moves much less with other processes' load than the wall clock does.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Optional

from scanformer_jax import timing
from scanformer_jax.bench.common import (MODES, ModeResult, bench_config, host_info,
                                         xla_flops)


def run(model: str = "vilt_b32", batch_size: int = 8, keep_ratio: float = 0.25,
        steps: int = 10, warmup: int = 2, dtype: str = "float32", seed: int = 0,
        text_len: Optional[int] = None) -> dict:
  """Compiles and times both modes; returns the report as a JSON-able dict."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from scanformer_jax import flops, forward
  from scanformer_jax.model import ScanFormer

  load_start = list(os.getloadavg())
  cfg = bench_config(model, keep_ratio, dtype)
  length = text_len or cfg.max_text_len
  keys = jax.random.split(jax.random.key(seed), 3)
  image = jax.random.uniform(keys[0], (batch_size, cfg.image_size, cfg.image_size, 3))
  text_ids = jax.random.randint(keys[1], (batch_size, length), 0, cfg.vocab_size)
  text_mask = jnp.ones((batch_size, length), bool)
  net = ScanFormer(cfg)
  variables = jax.jit(net.init)(keys[2], image[:1], text_ids[:1], text_mask[:1])
  args = (variables, image, text_ids, text_mask)

  compiled, compile_s, xla = {}, {}, {}
  for mode in MODES:
    fn = jax.jit(lambda v, i, t, m, mode=mode: forward.rows(
        cfg, v["params"], {"image": i, "text_ids": t, "text_mask": m}, mode))
    start = time.perf_counter()
    compiled[mode] = fn.lower(*args).compile()
    compile_s[mode] = time.perf_counter() - start
    flops_total = xla_flops(compiled[mode])
    xla[mode] = None if flops_total is None else flops_total / batch_size / 1e9

  outputs = {}
  for mode in MODES:
    for _ in range(max(warmup, 1)):
      outputs[mode] = jax.block_until_ready(compiled[mode](*args))
  wall, cpu, _ = timing.alternating_wall_and_cpu(
      {mode: lambda mode=mode: compiled[mode](*args) for mode in MODES}, steps)
  times = {mode: [1e3 * s for s in wall[mode]] for mode in MODES}  # ms
  cpu_times = {mode: [1e3 * s for s in cpu[mode]] for mode in MODES}

  analytic = {"dense": flops.dense_flops(cfg, length) / 1e9,
              "sparse": flops.sparse_flops(cfg, length) / 1e9}
  sparse_out = outputs["sparse"]
  taken = np.asarray(sparse_out["taken"])  # [B, S]
  effective = float(np.mean(flops.sparse_flops(cfg, length, taken))) / 1e9
  results = {}
  for mode in MODES:
    median = statistics.median(times[mode])
    results[mode] = ModeResult(
        mode=mode, compile_s=compile_s[mode], median_ms=median,
        samples_per_s=batch_size / (median / 1e3), gflops_per_sample=analytic[mode],
        xla_gflops_per_sample=xla[mode], median_cpu_ms=statistics.median(cpu_times[mode]),
        step_ms=[round(t, 2) for t in times[mode]])
  speedup = results["dense"].median_ms / results["sparse"].median_ms
  cpu_speedup = results["dense"].median_cpu_ms / results["sparse"].median_cpu_ms
  flops_ratio = analytic["dense"] / analytic["sparse"]
  return {
      "model": model, "dtype": dtype, "batch_size": batch_size, "keep_ratio": keep_ratio,
      "text_len": length, "steps": steps, "warmup": warmup,
      "num_patches": list(cfg.num_patches), "kept_per_scale": list(cfg.capacities),
      "mean_taken_per_scale": taken.mean(0).tolist(),
      "num_dropped": int(np.asarray(sparse_out["num_dropped"]).sum()),
      "sparse_effective_gflops_per_sample": effective,
      "modes": {mode: dataclasses.asdict(r) for mode, r in results.items()},
      "speedup": speedup, "cpu_time_speedup": cpu_speedup, "flops_ratio": flops_ratio,
      "speedup_over_flops_ratio": speedup / flops_ratio,
      "target_met": speedup >= 0.75 * flops_ratio,
      "host": host_info(load_start),
  }


def format_report(report: dict) -> str:
  """A readable table of one `run` report."""
  lines = [
      f"scanformer bench: {report['model']} {report['dtype']}, batch {report['batch_size']}, "
      f"text {report['text_len']}, keep ratio {report['keep_ratio']} "
      f"(patches per scale {report['num_patches']} -> kept {report['kept_per_scale']}), "
      f"median of {report['steps']} steps",
      f"{'mode':<8}{'compile s':>11}{'median ms':>11}{'samples/s':>11}"
      f"{'GFLOPs/sample':>15}{'XLA GFLOPs':>12}{'CPU ms':>10}",
  ]
  for mode in MODES:
    r = report["modes"][mode]
    xla = "n/a" if r["xla_gflops_per_sample"] is None else f"{r['xla_gflops_per_sample']:.2f}"
    lines.append(f"{mode:<8}{r['compile_s']:>11.1f}{r['median_ms']:>11.1f}"
                 f"{r['samples_per_s']:>11.1f}{r['gflops_per_sample']:>15.2f}{xla:>12}"
                 f"{r['median_cpu_ms']:>10.0f}")
  lines += [
      f"speedup {report['speedup']:.2f}x, FLOPs ratio {report['flops_ratio']:.2f}x "
      f"(speedup / FLOPs ratio = {report['speedup_over_flops_ratio']:.2f}; target >= 0.75: "
      f"{'met' if report['target_met'] else 'NOT met'}); CPU-time speedup "
      f"{report['cpu_time_speedup']:.2f}x",
      f"sparse effective GFLOPs/sample {report['sparse_effective_gflops_per_sample']:.2f}, "
      f"dropped patches {report['num_dropped']}, "
      f"load average {', '.join(f'{x:.2f}' for x in report['host']['loadavg'])}",
  ]
  return "\n".join(lines)


