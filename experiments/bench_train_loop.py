"""Train-loop steps/s with and without the device prefetch, float32 vs uint8 images.

    python experiments/bench_train_loop.py --model tiny --batch-size 8 --steps 20
    python experiments/bench_train_loop.py --model vilt_b32 --batch-size 4 --steps 4

The host batches are made once (no input pipeline cost): each loop variant takes
`--steps` steps as the trainer does (take a batch, call the step, no sync until the
end) with images sent as float32 (normalised on the host) or uint8 (normalised in the
step), either from the main thread between steps (`sharding.to_global`) or from the
background thread of `prefetch.DevicePrefetch` (2 batches in flight). The variants
run in alternating passes (`--passes`) and the median steps/s of each is printed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines import transforms  # noqa: E402
from data_pipelines.contract import DEVICE_KEYS  # noqa: E402
from scanformer_jax import optim, prefetch, sharding, train_state, train_step  # noqa: E402
from scanformer_jax.config import (LossConfig, MeshConfig, ModelConfig,  # noqa: E402
                                   OptimConfig, TrainConfig)

VARIANTS = ("float32 main-thread", "float32 prefetch", "uint8 main-thread", "uint8 prefetch")


def host_batches(cfg, batch_size: int, count: int, uint8: bool) -> list[dict]:
  rng = np.random.default_rng(0)
  r, length = cfg.image_size, cfg.max_text_len
  out = []
  for _ in range(count):
    pixels = rng.integers(0, 256, (batch_size, r, r, 3), dtype=np.uint8)
    batch = {"text_ids": rng.integers(1, cfg.vocab_size, (batch_size, length)).astype(np.int32),
             "text_mask": np.ones((batch_size, length), bool),
             "box": np.tile(np.array([[0.5, 0.5, 0.3, 0.3]], np.float32), (batch_size, 1)),
             "valid": np.ones((batch_size,), bool)}
    if uint8:
      batch["image"], batch["content_hw"] = pixels, np.full((batch_size, 2), r, np.int32)
    else:
      batch["image"] = np.stack([transforms.to_frame(p, r) for p in pixels])
    out.append(batch)
  return out


def run_loop(step, state, batches, mesh, steps: int, use_prefetch: bool):
  source = itertools.islice(itertools.cycle(batches), steps)
  keys = DEVICE_KEYS
  start = time.perf_counter()
  if use_prefetch:
    with prefetch.DevicePrefetch(source, mesh, keys, depth=2) as fetched:
      for i, device_batch in enumerate(fetched):
        state, metrics = step(state, device_batch, i)
  else:
    for i, host in enumerate(source):
      state, metrics = step(state, sharding.to_global(
          {k: host[k] for k in keys + prefetch.extra_keys(host)}, mesh), i)
  jax.block_until_ready(metrics)
  return state, steps / (time.perf_counter() - start)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=("tiny", "vilt_b32"), default="tiny")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--passes", type=int, default=3)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  cfg = getattr(ModelConfig, args.model)()
  mesh_cfg = MeshConfig(data=1)
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
  tx, schedules = optim.make_optimizer(OptimConfig(warmup_steps=0), 1000)
  loss = LossConfig(target_ratio=(1.0,) + (0.5,) * (cfg.num_scales - 1))
  shardings = train_state.state_shardings(cfg, tx, mesh, mesh_cfg)
  step = train_step.jit_train_step(
      train_step.make_train_step(cfg, loss, tx, schedules, TrainConfig(batch_size=args.batch_size)),
      shardings, mesh)
  state = train_state.create_train_state(cfg, tx, 0, mesh, mesh_cfg)
  data = {u: host_batches(cfg, args.batch_size, 4, u) for u in (False, True)}
  for uint8 in (False, True):  # Compile both input dtypes before timing.
    state, _ = run_loop(step, state, data[uint8], mesh, 2, False)
  rates = {v: [] for v in VARIANTS}
  for _ in range(args.passes):
    for variant in VARIANTS:
      uint8, use = variant.startswith("uint8"), variant.endswith("prefetch")
      state, rate = run_loop(step, state, data[uint8], mesh, args.steps, use)
      rates[variant].append(rate)
  report = {"model": args.model, "batch_size": args.batch_size, "steps": args.steps,
            "passes": args.passes, "backend": jax.default_backend(),
            "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
            "steps_per_s": {v: statistics.median(r) for v, r in rates.items()},
            "all_steps_per_s": rates, "loadavg": list(os.getloadavg())}
  print(json.dumps(report, indent=2))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
