"""One prepared check of the library on whatever accelerator JAX sees; writes one JSON.

    python experiments/accelerator_check.py --out accelerator_check.json \
        [--batch-size 32] [--steps 5] [--set model.remat=layer ...] [--smoke]

Reports the device kind; the fused attention's error against the float32 einsum
reference (per-key bias with padding and merged tokens; cuDNN on a GPU in bfloat16,
the XLA implementation elsewhere); and for ViLT-B/32 at 384 and 640 px in bfloat16:
dense and sparse forward and train step times (median of --steps after one warm-up),
samples/s, analytic model FLOPs (scanformer_jax.flops; train = 3x forward), MFU
(FLOPs/s over the device's peak bfloat16 FLOP/s from PEAK_BF16_FLOPS), the compiled
program's peak bytes (and the device's peak in use where it reports one) and compile
seconds. Meant to finish within 8 minutes on one GPU or TPU chip; `--smoke` runs the
tiny model at 32/64 px for one step on CPU (a test runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scanformer_jax import config_io, flops, optim, sharding, train_state, train_step  # noqa: E402
from scanformer_jax.bench.common import keep_counts  # noqa: E402
from scanformer_jax.bench.train import train_flops  # noqa: E402
from scanformer_jax.config import (ExperimentConfig, LossConfig, MeshConfig,  # noqa: E402
                                   ModelConfig, OptimConfig, TrainConfig)
from scanformer_jax.errors import UserError  # noqa: E402
from scanformer_jax.layers import NEG_INF, attend_einsum, attend_fused  # noqa: E402
from scanformer_jax.model import ScanFormer  # noqa: E402

# Dense bfloat16 peak FLOP/s per chip (vendor figures, no sparsity).
PEAK_BF16_FLOPS = {
    "H100": 989e12,   # SXM; the PCIe card: 756e12
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
}
KEEP_RATIO = 0.25
SIZES = {384: (96, 192, 384), 640: (160, 320, 640)}
# The smoke mode's model: two scales, two small layers (seconds to compile on a CPU).
SMOKE_MODEL = dict(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2, encoder1_layers=1,
                   image_sizes=(32, 64), patch_size=16, pos_grid_size=4, max_text_len=8,
                   vocab_size=40, box_head_layers=2)


def peak_flops(device_kind: str):
  """The table's peak for a device kind (longest matching name), else None."""
  for name in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
    if name.lower() in device_kind.lower():
      return PEAK_BF16_FLOPS[name]
  return None


def attention_error(smoke: bool) -> dict:
  """Max |fused - einsum(float32)| over a per-key bias with padding and merged tokens."""
  b, tq, tk, h, dh = (2, 9, 21, 2, 8) if smoke else (8, 401, 546, 12, 64)
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (b, t, h, dh)) for key, t in zip(keys, (tq, tk, tk)))
  bias = np.zeros((b, tk), np.float32)
  bias[:, 3] = NEG_INF
  bias[:, -4:-1] = NEG_INF
  bias[:, -1] = np.log(np.arange(1, b + 1) * 34.0)
  bias = jnp.asarray(bias)[:, None, None, :]
  want = attend_einsum(q, k, v, bias)
  on_gpu = jax.default_backend() == "gpu"
  out = {"reference": "attend_einsum float32"}
  for dtype in (jnp.float32, jnp.bfloat16):
    impl = "cudnn" if on_gpu and dtype == jnp.bfloat16 else "xla"
    try:
      got = jax.jit(lambda q, k, v, impl=impl: attend_fused(q, k, v, bias, impl))(
          *(x.astype(dtype) for x in (q, k, v)))
      out[f"{jnp.dtype(dtype).name}_{impl}_max_abs_err"] = float(
          jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
    except Exception as e:  # pylint: disable=broad-except  # Reported, not fatal.
      out[f"{jnp.dtype(dtype).name}_{impl}_error"] = f"{type(e).__name__}: {e}"[:300]
  return out


def _median_ms(fn, args, steps: int, carry_state: bool = False):
  """Median ms of `steps` calls after one warm-up; returns (median, last output)."""
  out = jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    if carry_state:
      args = (out[0],) + tuple(args[1:])
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(1e3 * (time.perf_counter() - start))
  return statistics.median(times), out


def _memory(compiled) -> dict:
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  temp, arg = int(stats.temp_size_in_bytes), int(stats.argument_size_in_bytes)
  out, alias = int(stats.output_size_in_bytes), int(stats.alias_size_in_bytes)
  return {"compiled_peak_bytes": arg + out - alias + temp, "temp_bytes": temp}


def check_size(size: int, sizes, args, overrides) -> dict:
  """Forward and train step, dense and sparse, of one image size."""
  base = (ModelConfig.tiny(**SMOKE_MODEL) if args.smoke
          else ModelConfig.vilt_b32(image_sizes=sizes))
  config = ExperimentConfig(model=base, train=TrainConfig(batch_size=args.batch_size),
                            loss=LossConfig(target_ratio=(1.0,) + (KEEP_RATIO,) * (
                                base.num_scales - 1)))
  config = config_io.apply_overrides(config, ["model.dtype=" + args.dtype, *overrides])
  cfg, tc = config.model, config.train
  counts = keep_counts(cfg.num_patches, KEEP_RATIO)
  n, length = tc.batch_size, cfg.max_text_len
  rng = np.random.default_rng(0)
  host = {"image": rng.uniform(-1, 1, (n, cfg.image_size, cfg.image_size, 3)).astype(np.float32),
          "text_ids": rng.integers(1, cfg.vocab_size, (n, length)).astype(np.int32),
          "text_mask": np.ones((n, length), bool),
          "box": np.tile(np.array([[0.5, 0.5, 0.3, 0.3]], np.float32), (n, 1)),
          "valid": np.ones((n,), bool)}
  mesh_cfg = MeshConfig(data=1)
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
  batch = sharding.to_global(host, mesh)
  tx, schedules = optim.make_optimizer(OptimConfig(warmup_steps=0), 1000)
  shardings = train_state.state_shardings(cfg, tx, mesh, mesh_cfg)
  peak = peak_flops(jax.devices()[0].device_kind)
  result = {"image_sizes": list(sizes), "num_patches": list(cfg.num_patches),
            "sparse_slots": list(counts), "batch_size": n, "dtype": cfg.dtype,
            "remat": getattr(cfg, "remat", "none"), "forward": {}, "train": {}}
  state = train_state.create_train_state(cfg, tx, 0, mesh, mesh_cfg)
  variables = {"params": jax.tree.map(jnp.copy, state.params)}  # The step donates its own.
  for path in ("dense", "sparse"):
    # Forward (inference): every patch, or the kept counts in capacity slots.
    fcfg = cfg if path == "dense" else cfg.replace(select_topk=counts, capacity=counts)
    net = ScanFormer(fcfg)
    fn = jax.jit(lambda v, i, t, m, net=net, path=path: net.apply(v, i, t, m, mode=path))
    start = time.perf_counter()
    compiled = fn.lower(variables, batch["image"], batch["text_ids"],
                        batch["text_mask"]).compile()
    compile_s = time.perf_counter() - start
    ms, _ = _median_ms(compiled, (variables, batch["image"], batch["text_ids"],
                                  batch["text_mask"]), args.steps)
    model_flops = (flops.dense_flops(cfg, length) if path == "dense"
                   else flops.sparse_flops(fcfg, length))
    result["forward"][path] = _timing(ms, n, model_flops, peak, compile_s, compiled)
    # Train step.
    path_tc = dataclasses.replace(tc, path=path,
                                  slots=counts if path == "sparse" else None)
    step = train_step.jit_train_step(
        train_step.make_train_step(cfg, config.loss, tx, schedules, path_tc),
        shardings, mesh)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    ms, out = _median_ms(compiled, (state, batch), args.steps, carry_state=True)
    state = out[0]
    step_flops = train_flops(cfg if path == "dense" else cfg.replace(capacity=counts),
                             length, path)
    entry = _timing(ms, n, step_flops, peak, compile_s, compiled)
    entry["loss"] = float(out[1]["loss"])
    result["train"][path] = entry
  return result


def _timing(ms, n, flops_per_sample, peak, compile_s, compiled) -> dict:
  samples_per_s = n / (ms / 1e3)
  achieved = flops_per_sample * samples_per_s
  return {"median_ms": ms, "samples_per_s": samples_per_s,
          "gflops_per_sample": flops_per_sample / 1e9, "tflops_per_s": achieved / 1e12,
          "mfu": achieved / peak if peak else None, "compile_s": compile_s,
          **_memory(compiled)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="accelerator_check.json")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--sizes", default="384,640", help="of 384, 640")
  parser.add_argument("--set", dest="overrides", nargs="+", action="append", default=[],
                      metavar="KEY=VALUE", help="config overrides, e.g. model.remat=layer")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny model at 32/64 px, batch 2, one step (CPU test)")
  args = parser.parse_args(argv)
  overrides = [o for group in args.overrides for o in group]
  if args.smoke:
    args.batch_size, args.steps = 2, 1
  started = time.perf_counter()
  device = jax.devices()[0]
  report = {"device_kind": device.device_kind, "backend": jax.default_backend(),
            "device_count": jax.device_count(), "jax": jax.__version__,
            "peak_bf16_flops": peak_flops(device.device_kind),
            "overrides": overrides, "smoke": args.smoke,
            "attention": attention_error(args.smoke), "sizes": {}}
  sizes = {64: (32, 64)} if args.smoke else {
      int(s): SIZES[int(s)] for s in args.sizes.split(",")}
  for size, scales in sizes.items():
    try:
      report["sizes"][str(size)] = check_size(size, scales, args, overrides)
    except UserError as e:  # A bad --set: one line.
      print(f"accelerator_check: {e}", file=sys.stderr)
      return 2
    stats = getattr(device, "memory_stats", lambda: None)()
    if stats and "peak_bytes_in_use" in stats:
      report["sizes"][str(size)]["device_peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
  report["seconds"] = time.perf_counter() - started
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report, indent=2))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
