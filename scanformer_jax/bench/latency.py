"""Batch-1 latency of dense, fixed-capacity and bucketed sparse inference (`bench --latency`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from scanformer_jax.bench.common import keep_counts

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

  from scanformer_jax import forward, timing  # pylint: disable=g-import-not-at-top
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
    path = "dense" if mode == "dense" else "sparse"
    fns[mode] = jax.jit(lambda v, i, t, m, cfg=cfg, path=path: forward.rows(
        cfg, v["params"], {"image": i, "text_ids": t, "text_mask": m}, path))
  times = {mode: [] for mode in LATENCY_MODES}
  used = {mode: [] for mode in LATENCY_MODES}
  dropped = {mode: 0 for mode in LATENCY_MODES}
  for index, sample in enumerate(samples):
    sample = tuple(jnp.asarray(x) for x in sample)
    for mode in LATENCY_MODES:  # Alternate the modes: background load hits all alike.
      seconds, out = timing.timed_pass(lambda mode=mode: fns[mode](variables, *sample))
      if index < max(warmup, 1):
        continue  # Compilation and warm-up.
      times[mode].append(1e3 * seconds)
      used[mode].append(np.asarray(out["capacity"])[0].tolist())
      dropped[mode] += int(np.asarray(out["num_dropped"]).sum())
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
