"""Attention alone: heads-major einsums vs `jax.nn.dot_product_attention`, per shape.

  python experiments/bench_attention.py --reps 5

The shapes are those of one forward pass of `tiny` and `vilt_b32` at batch 8: the
text block attending to itself, then each scale's block [REG | capacity slots |
merged] attending to the cache (text and earlier scales) and itself, with every
patch slotted (`capacity=None`) and, for vilt_b32, with capacities (16, 16, 64).
Each variant is jitted once; prints the median of `--reps` timed calls (ms) and the
ratio fused / einsum (< 1: the fused call is faster). `attention_implementation` in
scanformer_jax/layers.py quotes these numbers. On a GPU the bfloat16 rows also time
`attend_fused(..., "cudnn")` (what `attend` runs there) with its largest deviation
from the einsums, and one gradient through it checks that training shapes (odd
lengths, a [B, 1, 1, Tk] bias) are accepted.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from scanformer_jax.config import ModelConfig
from scanformer_jax.layers import NEG_INF, attend_einsum, attend_fused

BATCH = 8


def block_shapes(cfg: ModelConfig, text_len: int) -> list[tuple[str, int, int]]:
  """(name, queries, keys) of each attention call of one forward (one layer)."""
  shapes = [("text", text_len, text_len)]
  keys = text_len
  for s, capacity in enumerate(cfg.capacities):
    queries = 1 + capacity + (1 if s > 0 else 0)
    keys += queries
    shapes.append((f"scale{s}", queries, keys))
  return shapes


def time_ms(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))  # Compile and warm up.
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args(argv)
  configs = [("tiny", ModelConfig.tiny(), 16),
             ("vilt_b32", ModelConfig.vilt_b32(), 40),
             ("vilt_b32 cap16/16/64", ModelConfig.vilt_b32(capacity=(16, 16, 64)), 40)]
  einsum = jax.jit(attend_einsum)
  fused = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation="xla"))
  on_gpu = jax.default_backend() == "gpu"
  cudnn = jax.jit(functools.partial(attend_fused, implementation="cudnn"))
  print(f"backend {jax.default_backend()}, batch {BATCH}, median of {args.reps}")
  print(f"{'config':<22}{'block':<8}{'Tq':>5}{'Tk':>5}{'dtype':>10}"
        f"{'einsum ms':>11}{'fused ms':>10}{'fused/einsum':>14}"
        + (f"{'cudnn ms':>10}{'cudnn/einsum':>14}{'max |diff|':>12}" if on_gpu else ""))
  for name, cfg, text_len in configs:
    h, dh = cfg.num_heads, cfg.head_dim
    for block, tq, tk in block_shapes(cfg, text_len):
      for dtype in (jnp.float32, jnp.bfloat16):
        keys = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(keys[0], (BATCH, tq, h, dh), dtype)
        k = jax.random.normal(keys[1], (BATCH, tk, h, dh), dtype)
        v = jax.random.normal(keys[2], (BATCH, tk, h, dh), dtype)
        bias = jnp.where(jnp.arange(tk) < tk - 1, 0.0, NEG_INF)  # last key padded
        bias = jnp.broadcast_to(bias, (BATCH, 1, 1, tk)).astype(jnp.float32)
        t_einsum = time_ms(einsum, q, k, v, bias, reps=args.reps)
        t_fused = time_ms(fused, q, k, v, bias, reps=args.reps)
        line = (f"{name:<22}{block:<8}{tq:>5}{tk:>5}{jnp.dtype(dtype).name:>10}"
                f"{t_einsum:>11.3f}{t_fused:>10.3f}{t_fused / t_einsum:>14.2f}")
        if on_gpu and dtype == jnp.bfloat16:
          t_cudnn = time_ms(cudnn, q, k, v, bias, reps=args.reps)
          diff = jnp.abs(cudnn(q, k, v, bias).astype(jnp.float32)
                         - einsum(q, k, v, bias).astype(jnp.float32)).max()
          line += f"{t_cudnn:>10.3f}{t_cudnn / t_einsum:>14.2f}{float(diff):>12.4f}"
        print(line, flush=True)
  if on_gpu:
    q = jax.random.normal(jax.random.key(1), (BATCH, 17, 4, 64), jnp.bfloat16)
    k = jax.random.normal(jax.random.key(2), (BATCH, 57, 4, 64), jnp.bfloat16)
    bias = jnp.zeros((BATCH, 1, 1, 57))
    grad = jax.jit(jax.grad(lambda q, k: cudnn(q, k, k, bias).astype(jnp.float32).sum(),
                            argnums=(0, 1)))(q, k)
    print("cudnn gradient (Tq 17, Tk 57) finite:",
          all(bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in grad))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
