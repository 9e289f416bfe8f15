"""The memory plan of ViLT-B/32 training: which settings fit a device, before renting one.

For each image size, dtype, remat mode and train path, traces the train loss (no
compilation, nothing allocated) and counts the bytes its backward pass saves per
sample and once per microbatch (`bench.memory.residual_bytes`, backend independent).
A device then needs about

    state (f32 parameters + Adam moments) + f32 gradients (+ their sum when N > 1)
    + fixed residuals + rows per microbatch x residuals per sample

plus XLA's own temporaries (not counted here: `scanformer bench --train --memory`
reads them from the compiled program). Writes JSON and a markdown table:

    python experiments/memory_plan.py --out experiments/memory_plan.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import time

GB = 1e9
SIZES = {384: (96, 192, 384), 640: (160, 320, 640)}
GLOBAL_BATCH = 128  # The refcoco recipe's global batch.
MARGIN = 0.8  # A plan fits when it needs at most 80 % of the device (>= 20 % margin).


def measure(size: int, dtype: str, remat: str, path: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from scanformer_jax import optim, train_state, train_step  # pylint: disable=g-import-not-at-top
  from scanformer_jax.bench.memory import memory_config, residual_bytes  # pylint: disable=g-import-not-at-top
  from scanformer_jax.config import OptimConfig  # pylint: disable=g-import-not-at-top
  config = memory_config("vilt_b32", SIZES[size], 2,
                         [f"model.dtype={dtype}", f"model.remat={remat}", f"train.path={path}"])
  cfg = config.model
  tx, schedules = optim.make_optimizer(OptimConfig(), 1000)
  programs = train_step.make_train_step(cfg, config.loss, tx, schedules,
                                        dataclasses.replace(config.train, path=path))
  params = train_state.abstract_params(cfg)
  r, length = cfg.image_size, cfg.max_text_len

  def rows(n):
    batch = {"image": jax.ShapeDtypeStruct((n, r, r, 3), jnp.float32),
             "text_ids": jax.ShapeDtypeStruct((n, length), jnp.int32),
             "text_mask": jax.ShapeDtypeStruct((n, length), jnp.bool_),
             "box": jax.ShapeDtypeStruct((n, 4), jnp.float32),
             "valid": jax.ShapeDtypeStruct((n,), jnp.bool_)}
    return batch, jax.ShapeDtypeStruct((n, 2), jnp.uint32)
  one, two = (residual_bytes(programs.loss, params, *rows(n)) for n in (1, 2))
  param_bytes = sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(params))
  return {"size": size, "dtype": dtype, "remat": remat, "path": path,
          "per_sample_bytes": two - one, "fixed_bytes": 2 * one - two,
          "param_bytes": param_bytes}


def plan(entry: dict, device_gb: float, devices: int) -> tuple[int, float]:
  """(fewest microbatches N that fit, GB needed) for the global batch on `devices`."""
  rows = GLOBAL_BATCH // devices
  for n in (1, 2, 4, 8, 16, 32, 64, 128):
    if rows % n:
      continue
    state = 3 * entry["param_bytes"] + entry["param_bytes"] * (2 if n > 1 else 1)
    need = (state + entry["fixed_bytes"] + rows // n * entry["per_sample_bytes"]) / GB
    if need <= MARGIN * device_gb:
      return n, need
  return 0, float("nan")


def table(entries: list[dict], device_gb: float = 80.0) -> str:
  lines = ["| size | dtype | remat | path | GB/sample | GB fixed | 1 x 80 GB: N, GB | "
           "8 x 80 GB: N, GB |", "|---|---|---|---|---|---|---|---|"]
  for e in entries:
    cells = []
    for devices in (1, 8):
      n, need = plan(e, device_gb, devices)
      cells.append(f"N={n}, {need:.1f}" if n else "does not fit")
    lines.append(f"| {e['size']} | {e['dtype']} | {e['remat']} | {e['path']} | "
                 f"{e['per_sample_bytes'] / GB:.3f} | {e['fixed_bytes'] / GB:.3f} | "
                 f"{cells[0]} | {cells[1]} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="memory_plan.json", help="JSON output path")
  parser.add_argument("--sizes", default="384,640", help="finest image sizes to plan")
  args = parser.parse_args(argv)
  entries = []
  start = time.perf_counter()
  for size, dtype, remat, path in itertools.product(
      [int(s) for s in args.sizes.split(",")], ("float32", "bfloat16"),
      ("none", "layer", "dots"), ("dense", "sparse")):
    entries.append(measure(size, dtype, remat, path))
    print(f"{size} {dtype} {remat} {path}: {entries[-1]['per_sample_bytes'] / GB:.3f} GB/sample",
          flush=True)
  with open(args.out, "w") as f:
    json.dump({"global_batch": GLOBAL_BATCH, "margin": MARGIN, "entries": entries,
               "seconds": time.perf_counter() - start}, f, indent=1)
  print(table(entries))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
