"""One training step of the dense and the sparse train path, timed (`bench --train`).

Random weights, same batch. The sparse step's capacities are the kept counts of
`--keep-ratio`: its cost is fixed by them (what Gumbel takes beyond them is dropped
and counted, what it takes below them leaves padding slots), so it is timed at the
chosen sparsity whatever an untrained selection head wants.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Optional

from scanformer_jax import timing
from scanformer_jax.bench.common import (MODES, ModeResult, bench_config, host_info,
                                         keep_counts, xla_flops)

def train_flops(cfg, text_len, path: str) -> float:
  """Analytic training FLOPs per sample: 3x the forward matmuls (backward = 2x forward).

  dense: every patch a token. sparse: `cfg.capacities` slots plus the merged token as
  run, and the patch projection of EVERY patch (the replaced patches' embeddings feed
  the straight-through merged token).
  """
  from scanformer_jax import flops
  if path == "dense":
    forward = flops.dense_flops(cfg, text_len)
  else:
    forward = flops.forward_flops(cfg, text_len, flops.sparse_tokens_as_run(cfg),
                                  cfg.num_patches)
  return 3.0 * forward


def run_train(model: str = "vilt_b32", batch_size: int = 8, keep_ratio: float = 0.25,
              steps: int = 3, warmup: int = 1, dtype: str = "float32", seed: int = 0,
              text_len: Optional[int] = None) -> dict:
  """Compiles and times one train step per path; returns the report as a JSON-able dict."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from scanformer_jax import optim, sharding, train_state, train_step
  from scanformer_jax.config import LossConfig, MeshConfig, OptimConfig, TrainConfig

  load_start = list(os.getloadavg())
  cfg = bench_config(model, keep_ratio, dtype).replace(select_topk=None, capacity=None)
  counts = keep_counts(cfg.num_patches, keep_ratio)
  length = text_len or cfg.max_text_len
  keys = jax.random.split(jax.random.key(seed), 3)
  batch = {
      "image": jax.random.uniform(keys[0], (batch_size, cfg.image_size, cfg.image_size, 3)),
      "text_ids": jax.random.randint(keys[1], (batch_size, length), 0, cfg.vocab_size),
      "text_mask": jnp.ones((batch_size, length), bool),
      "box": jnp.concatenate([jnp.full((batch_size, 2), 0.5),
                              jax.random.uniform(keys[2], (batch_size, 2), minval=0.1,
                                                 maxval=0.5)], axis=1),
      "valid": jnp.ones((batch_size,), bool),
  }
  mesh_cfg = MeshConfig(data=1)
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
  batch = sharding.to_global({k: np.asarray(v) for k, v in batch.items()}, mesh)
  loss_cfg = LossConfig(target_ratio=(1.0,) + (keep_ratio,) * (cfg.num_scales - 1))
  tx, schedules = optim.make_optimizer(OptimConfig(warmup_steps=0), 1000)
  shardings = train_state.state_shardings(cfg, tx, mesh, mesh_cfg)

  compiled, compile_s, states, xla = {}, {}, {}, {}
  for path in MODES:
    train_cfg = TrainConfig(path=path, slots=counts if path == "sparse" else None)
    fn = train_step.jit_train_step(
        train_step.make_train_step(cfg, loss_cfg, tx, schedules, train_cfg), shardings, mesh)
    states[path] = train_state.create_train_state(cfg, tx, seed, mesh, mesh_cfg)
    start = time.perf_counter()
    compiled[path] = fn.lower(states[path], batch).compile()
    compile_s[path] = time.perf_counter() - start
    flops_total = xla_flops(compiled[path])
    xla[path] = None if flops_total is None else flops_total / batch_size / 1e9

  metrics = {}
  for path in MODES:
    for _ in range(max(warmup, 1)):
      states[path], metrics[path] = jax.block_until_ready(compiled[path](states[path], batch))
  def train_step_of(path):
    def run():
      states[path], metrics[path] = compiled[path](states[path], batch)
      return metrics[path]
    return run
  wall, cpu, _ = timing.alternating_wall_and_cpu(
      {path: train_step_of(path) for path in MODES}, steps)
  times = {path: [1e3 * s for s in wall[path]] for path in MODES}  # ms
  cpu_times = {path: [1e3 * s for s in cpu[path]] for path in MODES}

  sparse_cfg = cfg.replace(capacity=counts)
  analytic = {"dense": train_flops(cfg, length, "dense") / 1e9,
              "sparse": train_flops(sparse_cfg, length, "sparse") / 1e9}
  results = {}
  for path in MODES:
    median = statistics.median(times[path])
    results[path] = ModeResult(
        mode=path, compile_s=compile_s[path], median_ms=median,
        samples_per_s=batch_size / (median / 1e3), gflops_per_sample=analytic[path],
        xla_gflops_per_sample=xla[path], median_cpu_ms=statistics.median(cpu_times[path]),
        step_ms=[round(t, 2) for t in times[path]])
  speedup = results["dense"].median_ms / results["sparse"].median_ms
  flops_ratio = analytic["dense"] / analytic["sparse"]
  sparse_metrics = {k: float(v) for k, v in sharding.fetch(metrics["sparse"]).items()}
  return {
      "model": model, "dtype": dtype, "batch_size": batch_size, "keep_ratio": keep_ratio,
      "text_len": length, "steps": steps, "warmup": warmup,
      "num_patches": list(cfg.num_patches), "kept_per_scale": list(counts),
      "sparse_dropped_per_scale": [sparse_metrics.get(f"dropped_s{s}", 0.0)
                                   for s in range(cfg.num_scales)],
      "losses": {path: float(sharding.fetch(metrics[path])["loss"]) for path in MODES},
      "modes": {path: dataclasses.asdict(r) for path, r in results.items()},
      "speedup": speedup,
      "cpu_time_speedup": results["dense"].median_cpu_ms / results["sparse"].median_cpu_ms,
      "flops_ratio": flops_ratio, "speedup_over_flops_ratio": speedup / flops_ratio,
      "target_met": speedup >= 0.75 * flops_ratio,
      "host": host_info(load_start),
  }


def format_train_report(report: dict) -> str:
  """A readable table of one `run_train` report."""
  lines = [
      f"scanformer bench --train: {report['model']} {report['dtype']}, batch "
      f"{report['batch_size']}, text {report['text_len']}, keep ratio {report['keep_ratio']} "
      f"(patches per scale {report['num_patches']} -> sparse capacity "
      f"{report['kept_per_scale']}), median of {report['steps']} train steps",
      f"{'path':<8}{'compile s':>11}{'median ms':>11}{'samples/s':>11}"
      f"{'train GFLOPs/sample':>21}{'XLA GFLOPs':>12}{'CPU ms':>10}",
  ]
  for path in MODES:
    r = report["modes"][path]
    xla = "n/a" if r["xla_gflops_per_sample"] is None else f"{r['xla_gflops_per_sample']:.2f}"
    lines.append(f"{path:<8}{r['compile_s']:>11.1f}{r['median_ms']:>11.1f}"
                 f"{r['samples_per_s']:>11.1f}{r['gflops_per_sample']:>21.2f}{xla:>12}"
                 f"{r['median_cpu_ms']:>10.0f}")
  lines += [
      f"speedup {report['speedup']:.2f}x, training-FLOPs ratio {report['flops_ratio']:.2f}x "
      f"(speedup / FLOPs ratio = {report['speedup_over_flops_ratio']:.2f}; target >= 0.75: "
      f"{'met' if report['target_met'] else 'NOT met'}); CPU-time speedup "
      f"{report['cpu_time_speedup']:.2f}x",
      f"sparse patches dropped per scale (last step, batch) {report['sparse_dropped_per_scale']}, "
      f"load average {', '.join(f'{x:.2f}' for x in report['host']['loadavg_start'])} -> "
      f"{', '.join(f'{x:.2f}' for x in report['host']['loadavg'])}",
  ]
  return "\n".join(lines)


