"""Where a train step's time goes: an XLA:CPU trace of the demo's warm-up and main
programs, summed by kind of op and by model component.

    python experiments/profile_train_step.py --config experiments/configs/synthetic_tiny.py

Each program (warm-up: every patch taken; main: the config's train path) is compiled
once, run `--steps` times under `jax.profiler.trace` (a Perfetto trace), and every
XLA op event is attributed through the compiled HLO's `op_name` metadata: to a kind
(matmul: YNNPACK/dot; copy/transpose; broadcast; other elementwise) and to a model
component (the flax module path, forward or backward). Times are summed over the
threads that ran them (the intra-op pool), so a table's total can exceed the wall
time. Also printed: wall ms per step, XLA's FLOPs per example and the GFLOP/s they
reach. `--json PATH` writes everything.

`--speed-only --steps-per-call 8` times the two programs as the demo runs them (eight
optimizer steps per compiled call) without the trace: run it once per `XLA_FLAGS`
setting (compiler flags, `--xla_force_host_platform_device_count`: the batch is split
over every device), alternating, to compare settings that are fixed per process.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scanformer_jax import (config_io, optim, sharding, train_state,  # noqa: E402
                            train_step)
from scanformer_jax.bench.common import xla_flops  # noqa: E402

_HOST_EVENTS = ("$", "Thunk", "Pjit", "PjRt", "Pjrt", "Slinky", "Parse")


def op_kind(name: str) -> str:
  base = re.sub(r"\.\d+$", "", name)
  if base.startswith(("ynn_fusion", "dot")) or "convolution" in base:
    return "matmul (YNNPACK / dot)"
  if any(w in base for w in ("copy", "transpose", "bitcast")):
    return "copy / transpose"
  if "broadcast" in base:
    return "broadcast"
  if "gather" in base or "scatter" in base or "dynamic" in base:
    return "gather / scatter"
  if "reduce" in base:
    return "reduce"
  return "other elementwise"


def component(op_name: str) -> str:
  """'fwd|bwd <last module path parts>' of an HLO op_name, layers folded."""
  backward = "transpose(" in op_name
  parts = [re.sub(r"^\w+\((.*)\)$", r"\1", p) for p in op_name.split("/")]
  modules = [p for p in parts if p[:1].isupper() or p.startswith(("layers_", "attn", "mlp",
                                                                   "norm", "patch"))]
  tail = "/".join(p.split(".")[-1] for p in modules[-3:]) or parts[-1]
  return ("bwd " if backward else "fwd ") + re.sub(r"layers_\d+", "layers_N", tail)


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  names = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]*)\"", line)
    if m:
      names[m.group(1)] = m.group(2)
  return names


def trace_events(directory: str) -> list[dict]:
  path = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [e for e in events if e.get("ph") == "X"]


def profile_program(fn, state, batch, step: int, steps: int, batch_size: int,
                    steps_per_call: int = 1, trace: bool = True) -> dict:
  """Wall time per optimizer step and examples/s of one compiled program (`steps`
  calls of `steps_per_call` steps of `batch_size` examples); with `trace`, also its
  FLOPs and the attributed op times."""
  state, metrics = fn(state, batch, step)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = fn(state, batch, step)
  jax.block_until_ready(metrics)
  wall = (time.perf_counter() - start) / steps  # per call
  speed = {"wall_ms_per_step": 1e3 * wall / steps_per_call,
           "examples_per_s": steps_per_call * batch_size / wall}
  if not trace:
    return speed, state
  compiled = fn.lower(state, batch, step).compile()
  names = hlo_op_names(compiled.as_text())
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      for _ in range(steps):
        state, metrics = fn(state, batch, step)
      jax.block_until_ready(metrics)
    events = trace_events(directory)
  kinds, parts = collections.Counter(), collections.Counter()
  unattributed = 0.0
  for e in events:
    name, ms = e["name"], e.get("dur", 0) / 1e3 / steps
    if name.startswith(_HOST_EVENTS) or "Thunk" in name:
      continue
    kinds[op_kind(name)] += ms
    if name in names:
      parts[component(names[name])] += ms
    else:
      unattributed += ms
  flops = xla_flops(compiled)  # per call
  per_example = None if flops is None else flops / (steps_per_call * batch_size)
  return {**speed,
          "xla_gflops_per_example": None if per_example is None else per_example / 1e9,
          "gflops_per_s": None if flops is None else flops / wall / 1e9,
          "op_ms_by_kind": dict(kinds.most_common()),
          "op_ms_by_component": dict(parts.most_common()),
          "op_ms_unattributed": unattributed}, state


def random_batch(cfg, batch_size: int) -> dict:
  rng = np.random.default_rng(0)
  r, length = cfg.image_size, cfg.max_text_len
  return {"image": rng.integers(0, 256, (batch_size, r, r, 3), dtype=np.uint8),
          "content_hw": np.full((batch_size, 2), r, np.int32),
          "text_ids": rng.integers(1, cfg.vocab_size, (batch_size, length)).astype(np.int32),
          "text_mask": np.ones((batch_size, length), bool),
          "box": np.tile(np.array([[0.5, 0.5, 0.3, 0.3]], np.float32), (batch_size, 1)),
          "valid": np.ones((batch_size,), bool)}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="experiments/configs/synthetic_tiny.py")
  parser.add_argument("--set", dest="overrides", action="append", default=[])
  parser.add_argument("--steps", type=int, default=5, help="traced steps per program")
  parser.add_argument("--steps-per-call", type=int, default=1,
                      help="optimizer steps per compiled call (the demo runs 8)")
  parser.add_argument("--speed-only", action="store_true",
                      help="examples/s of each program only, no trace")
  parser.add_argument("--top", type=int, default=12, help="components printed per program")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  config = config_io.apply_overrides(config_io.load_config_file(args.config), args.overrides)
  cfg, tc = config.model, config.train
  # One step per call by default: the step's own ops (bench --train --loop times the loop).
  calls = args.steps_per_call
  tc = dataclasses.replace(tc, steps_per_call=calls)
  mesh = sharding.make_mesh(config.mesh, jax.devices())
  tx, schedules = optim.make_optimizer(config.optim, tc.num_steps)
  shardings = train_state.state_shardings(cfg, tx, mesh, config.mesh)
  fn = train_step.jit_train_step(
      train_step.make_train_step(cfg, config.loss, tx, schedules, tc, 1), shardings, mesh,
      calls)
  state = train_state.create_train_state(cfg, tx, 0, mesh, config.mesh)
  rows = random_batch(cfg, tc.batch_size)
  if calls > 1:  # [K, B, ...]: one batch per step of the call
    rows = {k: np.stack([v] * calls) for k, v in rows.items()}
  batch = sharding.to_global(rows, mesh, stacked=calls > 1)
  report = {"config": args.config, "overrides": args.overrides, "batch_size": tc.batch_size,
            "steps_per_call": calls, "devices": len(jax.devices()),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "loadavg": list(os.getloadavg()), "programs": {}}
  for program, step in (("warmup", 0), ("main", max(tc.select_warmup_steps, 1) * 10)):
    result, state = profile_program(fn, state, batch, step, args.steps, tc.batch_size,
                                    calls, trace=not args.speed_only)
    report["programs"][program] = result
    if args.speed_only:
      print(f"{program}: {result['wall_ms_per_step']:.1f} ms/step wall "
            f"({result['examples_per_s']:.1f} examples/s)")
      continue
    total = sum(result["op_ms_by_kind"].values())
    print(f"\n{program}: {result['wall_ms_per_step']:.1f} ms/step wall "
          f"({result['examples_per_s']:.0f} examples/s), XLA "
          f"{result['xla_gflops_per_example']:.3f} GFLOP/example = "
          f"{result['gflops_per_s']:.1f} GFLOP/s; op time over threads {total:.1f} ms/step")
    for kind, ms in result["op_ms_by_kind"].items():
      print(f"  {kind:<26}{ms:8.1f} ms {ms / total:6.1%}")
    print("  top components (op time):")
    for part, ms in list(result["op_ms_by_component"].items())[:args.top]:
      print(f"    {ms:7.2f} ms {ms / total:6.1%}  {part}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
