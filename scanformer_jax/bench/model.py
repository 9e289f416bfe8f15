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
import platform
import statistics
import time
from typing import Optional

MODELS = ("tiny", "vilt_b32")
MODES = ("dense", "sparse")


@dataclasses.dataclass
class ModeResult:
  mode: str
  compile_s: float
  median_ms: float
  samples_per_s: float
  gflops_per_sample: float        # analytic, as run
  xla_gflops_per_sample: Optional[float]  # XLA cost analysis of the compiled program
  median_cpu_ms: float            # process CPU time per batch (all threads): robust to load
  step_ms: list


def keep_counts(num_patches: tuple[int, ...], keep_ratio: float) -> tuple[int, ...]:
  """Patches kept per scale: all at scale 0, round(R * N_s) at s >= 1 (at least 1)."""
  return (num_patches[0],) + tuple(max(1, int(round(keep_ratio * n))) for n in num_patches[1:])


def bench_config(model: str, keep_ratio: float, dtype: str):
  """The preset with `select_topk` and `capacity` set to the kept counts."""
  from scanformer_jax.config import ModelConfig
  base = getattr(ModelConfig, model)(dtype=dtype)
  counts = keep_counts(base.num_patches, keep_ratio)
  return base.replace(select_topk=counts, capacity=counts)


def _xla_flops(compiled) -> Optional[float]:
  """Total FLOPs of a compiled program per XLA (dict, or list of dicts in some versions)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Not every backend implements it.
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def run(model: str = "vilt_b32", batch_size: int = 8, keep_ratio: float = 0.25,
        steps: int = 10, warmup: int = 2, dtype: str = "float32", seed: int = 0,
        text_len: Optional[int] = None) -> dict:
  """Compiles and times both modes; returns the report as a JSON-able dict."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from scanformer_jax import flops
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
    fn = jax.jit(lambda v, i, t, m, mode=mode: net.apply(v, i, t, m, mode=mode))
    start = time.perf_counter()
    compiled[mode] = fn.lower(*args).compile()
    compile_s[mode] = time.perf_counter() - start
    flops_total = _xla_flops(compiled[mode])
    xla[mode] = None if flops_total is None else flops_total / batch_size / 1e9

  outputs = {}
  for mode in MODES:
    for _ in range(max(warmup, 1)):
      outputs[mode] = jax.block_until_ready(compiled[mode](*args))
  times = {mode: [] for mode in MODES}
  cpu_times = {mode: [] for mode in MODES}
  for _ in range(steps):  # Alternate the modes: background load hits both alike.
    for mode in MODES:
      start, cpu_start = time.perf_counter(), time.process_time()
      jax.block_until_ready(compiled[mode](*args))
      times[mode].append(1e3 * (time.perf_counter() - start))
      cpu_times[mode].append(1e3 * (time.process_time() - cpu_start))

  analytic = {"dense": flops.dense_flops(cfg, length) / 1e9,
              "sparse": flops.sparse_flops(cfg, length) / 1e9}
  sparse_out = outputs["sparse"]
  taken = np.stack([np.asarray(t).sum(-1) for t in sparse_out.taken], -1)  # [B, S]
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
      "num_dropped": int(np.asarray(sparse_out.num_dropped).sum()),
      "sparse_effective_gflops_per_sample": effective,
      "modes": {mode: dataclasses.asdict(r) for mode, r in results.items()},
      "speedup": speedup, "cpu_time_speedup": cpu_speedup, "flops_ratio": flops_ratio,
      "speedup_over_flops_ratio": speedup / flops_ratio,
      "target_met": speedup >= 0.75 * flops_ratio,
      "host": {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
               "cpu_count": os.cpu_count(), "loadavg_start": load_start,
               "loadavg": list(os.getloadavg()),
               "jax": jax.__version__, "python": platform.python_version()},
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


# ---------------------------------------------------------------- training (`--train`)
# One training step (forward + backward + AdamW update) of the dense and the sparse
# train path (`train.path`), random weights, same batch. The sparse step's capacities
# are the kept counts of `--keep-ratio`: its cost is fixed by them (what Gumbel takes
# beyond them is dropped and counted, what it takes below them leaves padding slots),
# so it is timed at the chosen sparsity whatever an untrained selection head wants.


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
    train_cfg = TrainConfig(path=path, capacity=counts if path == "sparse" else None)
    fn = train_step.jit_train_step(
        train_step.make_train_step(cfg, loss_cfg, tx, schedules, train_cfg), shardings, mesh)
    states[path] = train_state.create_train_state(cfg, tx, seed, mesh, mesh_cfg)
    start = time.perf_counter()
    compiled[path] = fn.lower(states[path], batch).compile()
    compile_s[path] = time.perf_counter() - start
    flops_total = _xla_flops(compiled[path])
    xla[path] = None if flops_total is None else flops_total / batch_size / 1e9

  metrics = {}
  for path in MODES:
    for _ in range(max(warmup, 1)):
      states[path], metrics[path] = jax.block_until_ready(compiled[path](states[path], batch))
  times = {path: [] for path in MODES}
  cpu_times = {path: [] for path in MODES}
  for _ in range(steps):  # Alternate the paths: background load hits both alike.
    for path in MODES:
      start, cpu_start = time.perf_counter(), time.process_time()
      states[path], metrics[path] = jax.block_until_ready(compiled[path](states[path], batch))
      times[path].append(1e3 * (time.perf_counter() - start))
      cpu_times[path].append(1e3 * (time.process_time() - cpu_start))

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
      "host": {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
               "cpu_count": os.cpu_count(), "loadavg_start": load_start,
               "loadavg": list(os.getloadavg()),
               "jax": jax.__version__, "python": platform.python_version()},
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


# ---------------------------------------------------------------- latency (`--latency`)
LATENCY_MODES = ("dense", "fixed", "bucketed")


def latency_buckets(num_patches: tuple[int, ...], keep_ratio: float) -> tuple:
  """Random-weight buckets per scale: half the kept count, the kept count, every patch."""
  from scanformer_jax import capacity  # pylint: disable=g-import-not-at-top
  buckets = [(num_patches[0],)]
  for n in num_patches[1:]:
    sizes = {capacity.round_up(keep_ratio * n / 2, n), capacity.round_up(keep_ratio * n, n), n}
    buckets.append(tuple(sorted(sizes)))
  return tuple(buckets)


def _percentile(values: list, q: float) -> float:
  import numpy as np  # pylint: disable=g-import-not-at-top
  return float(np.percentile(np.asarray(values), q))


def run_latency(model: str = "tiny", workdir: Optional[str] = None, steps: int = 20,
                warmup: int = 2, keep_ratio: float = 0.25, dtype: str = "float32",
                seed: int = 0, split: Optional[str] = None) -> dict:
  """Batch-1 latency (p50/p90 of `steps` samples) of dense, fixed-capacity sparse and
  bucketed sparse inference.

  workdir: a trained (ideally calibrated) run: its parameters, its `model.capacity`
  and `model.capacity_buckets`, and `steps` real samples of `split` (default the
  first eval split), so the selection is the model's own. Without it: `model`'s
  preset with random weights and random inputs, capacities from `keep_ratio`
  (`keep_counts`, `latency_buckets`); the selection of random weights is arbitrary.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from scanformer_jax.model import ScanFormer  # pylint: disable=g-import-not-at-top
  if workdir:
    from scanformer_jax import data_source, workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    run = workdir_lib.load_for_inference(workdir)
    config = run.config
    base = config.model.replace(capacity=None, capacity_buckets=None)
    fixed = config.model.capacity or keep_counts(base.num_patches, keep_ratio)
    buckets = config.model.capacity_buckets or latency_buckets(base.num_patches, keep_ratio)
    variables = {"params": run.params}
    config = config.replace(eval=dataclasses.replace(config.eval, batch_size=1))
    batches = data_source.eval_batches(config, split or config.data.eval_splits[0], run.mesh)
    samples = []
    for batch in batches:
      if np.asarray(batch["valid"]).all():
        samples.append((batch["image"], batch["text_ids"], batch["text_mask"]))
      if len(samples) == steps + max(warmup, 1):
        break
    source = f"workdir {workdir} (step {run.step}): real selection on {len(samples)} samples"
  else:
    from scanformer_jax.config import ModelConfig  # pylint: disable=g-import-not-at-top
    base = getattr(ModelConfig, model)(dtype=dtype)
    fixed = keep_counts(base.num_patches, keep_ratio)
    buckets = latency_buckets(base.num_patches, keep_ratio)
    rng = np.random.default_rng(seed)
    length = base.max_text_len
    samples = [(rng.uniform(0, 1, (1, base.image_size, base.image_size, 3)).astype(np.float32),
                rng.integers(0, base.vocab_size, (1, length)).astype(np.int32),
                np.ones((1, length), bool)) for _ in range(steps + max(warmup, 1))]
    variables = jax.jit(ScanFormer(base).init)(jax.random.key(seed), *samples[0])
    source = (f"{model}, RANDOM weights and inputs: the selection is arbitrary (pass "
              "--workdir for a trained model's own)")
  configs = {"dense": base, "fixed": base.replace(capacity=tuple(fixed)),
             "bucketed": base.replace(capacity_buckets=tuple(map(tuple, buckets)))}
  fns = {}
  for mode, cfg in configs.items():
    net = ScanFormer(cfg)
    path = "dense" if mode == "dense" else "sparse"
    fns[mode] = jax.jit(lambda v, i, t, m, net=net, path=path: net.apply(v, i, t, m, mode=path))
  times = {mode: [] for mode in LATENCY_MODES}
  used = {mode: [] for mode in LATENCY_MODES}
  dropped = {mode: 0 for mode in LATENCY_MODES}
  for index, sample in enumerate(samples):
    sample = tuple(jnp.asarray(x) for x in sample)
    for mode in LATENCY_MODES:  # Alternate the modes: background load hits all alike.
      start = time.perf_counter()
      out = jax.block_until_ready(fns[mode](variables, *sample))
      if index < max(warmup, 1):
        continue  # Compilation and warm-up.
      times[mode].append(1e3 * (time.perf_counter() - start))
      if out.capacity is not None:
        used[mode].append(np.asarray(out.capacity)[0].tolist())
        dropped[mode] += int(np.asarray(out.num_dropped).sum())
  modes = {}
  for mode in LATENCY_MODES:
    entry = {"p50_ms": _percentile(times[mode], 50), "p90_ms": _percentile(times[mode], 90),
             "patches_dropped": dropped[mode]}
    if used[mode]:
      entry["mean_capacity"] = np.mean(used[mode], 0).tolist()
    modes[mode] = entry
  return {"source": source, "dtype": dtype, "steps": len(times["dense"]),
          "num_patches": list(base.num_patches), "fixed_capacity": list(fixed),
          "capacity_buckets": [list(b) for b in buckets], "modes": modes,
          "host": {"backend": jax.default_backend(), "cpu_count": os.cpu_count(),
                   "loadavg": list(os.getloadavg())}}


def format_latency(report: dict) -> str:
  """A readable table of one `run_latency` report."""
  lines = [f"scanformer bench --latency: {report['source']}",
           f"batch 1, {report['steps']} timed samples, patches {report['num_patches']}, "
           f"fixed capacity {report['fixed_capacity']}, buckets {report['capacity_buckets']}",
           f"{'mode':<10}{'p50 ms':>10}{'p90 ms':>10}{'dropped':>9}  mean slots per scale"]
  for mode in LATENCY_MODES:
    r = report["modes"][mode]
    slots = " ".join(f"{c:.1f}" for c in r.get("mean_capacity", report["num_patches"]))
    lines.append(f"{mode:<10}{r['p50_ms']:>10.2f}{r['p90_ms']:>10.2f}"
                 f"{r['patches_dropped']:>9}  {slots}")
  return "\n".join(lines)
