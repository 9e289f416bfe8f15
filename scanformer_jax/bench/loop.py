"""The training loop of a config, timed against a baseline loop in one run
(`bench --train --loop --config C`).

Each variant is a real `trainer._Run` in its own temporary workdir: its data
iterator, host-to-device transfer, compiled step and per-step hooks (metrics, log
lines every `train.log_every`) run exactly as in `scanformer train`; evaluation and
periodic checkpoints are switched off, and one checkpoint per variant is timed after
the passes.
The variants take `--steps` steps in turn, `--passes` times (paired passes on a
noisy machine), once with the warm-up program (every patch taken) and once with the
main program (the config's train path). Reported per variant and program: median
examples/s with its min-max over passes, the paired speedup over the baseline,
CPU seconds per example, XLA's FLOPs per example and the GFLOP/s they reach, and
their share of a jitted float32 matmul of the demo's layer shape timed in the same
passes (what the machine does on that shape).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import tempfile
import time
from typing import Sequence

from scanformer_jax import timing

# The loop before ready rows and multi-step calls: every sample decoded and
# letterboxed in every epoch, one compiled call (dispatch, transfer, host check) per
# optimizer step.
BASELINE_OVERRIDES = ("data.ready_rows=False", "train.steps_per_call=1")
PROGRAMS = ("warmup", "main")
MATMUL_SHAPE = (3040, 128, 128)  # [M, K] x [K, N]: the demo's tokens x hidden x hidden.


def matmul_rate(shape: Sequence[int] = MATMUL_SHAPE):
  """A callable running one jitted float32 matmul of `shape`, and its FLOPs."""
  import jax
  import jax.numpy as jnp
  m, k, n = shape
  a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)  # [M, K]
  b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)  # [K, N]
  fn = jax.jit(jnp.matmul)
  fn(a, b).block_until_ready()
  return (lambda: fn(a, b).block_until_ready()), 2.0 * m * k * n


def _variant_config(config, overrides: Sequence[str], program: str):
  """`config` with `overrides`, one program for every step, no eval or checkpoints."""
  from scanformer_jax import config_io
  config = config_io.apply_overrides(config, list(overrides))
  huge = 10**9
  warmup_steps = huge if program == "warmup" else 0
  return config.replace(
      train=dataclasses.replace(config.train, select_warmup_steps=warmup_steps,
                                num_steps=huge),
      eval=dataclasses.replace(config.eval, every_steps=0),
      checkpoint=dataclasses.replace(config.checkpoint, every_steps=huge))


class _LoopRunner:
  """One variant's `trainer._Run`, opened, stepping on demand."""


  def __init__(self, config, workdir: str, held: contextlib.ExitStack):
    from scanformer_jax import trainer
    self.run = trainer._Run(config, workdir, None, False, (),  # pylint: disable=protected-access
                            trainer._ResumeOptions())  # pylint: disable=protected-access
    self.run.setup(held)
    self.run.restore()
    self.run.open_loop()
    held.callback(self.run.close_loop)
    self.step_count = 0
    self.batch_size = config.train.batch_size
    self.steps_per_call = config.train.steps_per_call

  def steps(self, count: int) -> None:
    """`count` updates (a whole number of `train.steps_per_call` calls), until done on
    device."""
    import jax
    if count % self.steps_per_call:
      raise ValueError(f"{count} steps are not whole calls of {self.steps_per_call}")
    metrics = None
    for _ in range(count // self.steps_per_call):
      self.step_count += self.steps_per_call
      metrics = self.run.step(self.step_count)
      self.run.periodic(self.step_count, metrics)
    jax.block_until_ready(metrics)

  def checkpoint_seconds(self) -> tuple[float, float]:
    """One checkpoint of the current state: seconds the loop waits for `save` (the
    save is asynchronous) and seconds until it is written."""
    start = time.perf_counter()
    self.run.save(self.step_count)
    blocking = time.perf_counter() - start
    self.run.ckpt.wait()
    return blocking, time.perf_counter() - start

  def xla_flops_per_example(self):
    """XLA's FLOPs of one optimizer step of the compiled program, per example (None if
    unknown). XLA's cost analysis counts a loop body once, so a K-step call's count is
    already that of one step."""
    from scanformer_jax.bench.common import xla_flops
    step_fn, state = self.run.step_fn, self.run.state
    program = step_fn.program(self.step_count)
    compiled = program.lower(state, self._example_batch()).compile()
    total = xla_flops(compiled)
    return None if total is None else total / self.batch_size

  def _example_batch(self):
    import numpy as np

    from scanformer_jax import sharding as sharding_lib
    cfg = self.run.config.model
    b, r, length = self.batch_size, cfg.image_size, cfg.max_text_len
    host = {"image": np.zeros((b, r, r, 3), np.uint8),
            "content_hw": np.full((b, 2), r, np.int32),
            "text_ids": np.zeros((b, length), np.int32),
            "text_mask": np.ones((b, length), bool),
            "box": np.full((b, 4), 0.5, np.float32), "valid": np.ones((b,), bool)}
    k = self.steps_per_call
    if k > 1:
      host = {name: np.stack([x] * k) for name, x in host.items()}  # [K, B, ...]
    return sharding_lib.to_global(host, self.run.mesh, stacked=k > 1)


def run_loop(config, baseline_overrides: Sequence[str] = BASELINE_OVERRIDES,
             steps: int = 32, passes: int = 5, warm_steps: int = 16) -> dict:
  """Times the config's loop and the baseline loop (module docstring); a JSON-able dict."""
  from scanformer_jax.bench.common import host_info
  load_start = list(os.getloadavg())
  matmul, matmul_flops = matmul_rate()
  variants = {"baseline": list(baseline_overrides), "config": []}
  report = {"config_overrides_of_baseline": list(baseline_overrides), "steps": steps,
            "passes": passes, "batch_size": config.train.batch_size, "programs": {}}
  for program in PROGRAMS:
    with contextlib.ExitStack() as held, tempfile.TemporaryDirectory() as tmp:
      runners = {name: _LoopRunner(_variant_config(config, overrides, program),
                                   os.path.join(tmp, name), held)
                 for name, overrides in variants.items()}
      # Every variant runs the same number of steps, in whole calls of each's K.
      calls = math.lcm(*(r.steps_per_call for r in runners.values()))
      steps, warm_steps = (-(-n // calls) * calls for n in (steps, warm_steps))
      report["steps"] = steps
      for runner in runners.values():
        runner.steps(warm_steps)  # Compiles; fills the prefetch buffers.
      wall = {name: [] for name in runners}
      cpu = {name: [] for name in runners}
      matmul_s = []
      for _ in range(passes):
        for name, runner in runners.items():
          start, cpu_start = time.perf_counter(), time.process_time()
          runner.steps(steps)
          wall[name].append(time.perf_counter() - start)
          cpu[name].append(time.process_time() - cpu_start)
        matmul_s.append(timing.timed_pass(lambda: [matmul() for _ in range(20)])[0] / 20)
      matmul_gflops = matmul_flops / statistics.median(matmul_s) / 1e9
      examples = steps * config.train.batch_size
      results = {}
      for name, runner in runners.items():
        save_blocking_s, save_written_s = runner.checkpoint_seconds()
        rates = [examples / w for w in wall[name]]
        flops = runner.xla_flops_per_example()
        median_rate = statistics.median(rates)
        gflops = None if flops is None else flops * median_rate / 1e9
        results[name] = {
            "examples_per_s": median_rate, "examples_per_s_min": min(rates),
            "examples_per_s_max": max(rates),
            "cpu_ms_per_example": 1e3 * statistics.median(cpu[name]) / examples,
            "xla_gflops_per_example": None if flops is None else flops / 1e9,
            "gflops_per_s": gflops,
            "share_of_matmul_rate": None if gflops is None else gflops / matmul_gflops,
            "checkpoint_blocking_s": save_blocking_s, "checkpoint_written_s": save_written_s}
      ratios = timing.paired_ratios(wall["baseline"], wall["config"])
      report["programs"][program] = {
          "variants": results, "matmul_gflops_per_s": matmul_gflops,
          "speedup_median": ratios["median"], "speedup_min": ratios["min"],
          "speedup_max": ratios["max"]}
  report["host"] = host_info(load_start)
  return report


def format_loop(report: dict) -> str:
  """A readable table of one `run_loop` report."""
  lines = [f"scanformer bench --train --loop: batch {report['batch_size']}, "
           f"{report['passes']} paired passes of {report['steps']} steps; baseline = "
           f"config with {' '.join(report['config_overrides_of_baseline']) or 'nothing'}",
           f"{'program':<8}{'variant':<10}{'ex/s':>8}{'(min-max)':>14}{'CPU ms/ex':>11}"
           f"{'GFLOP/ex':>10}{'GFLOP/s':>9}{'of matmul':>11}{'ckpt s':>13}"]
  for program, entry in report["programs"].items():
    for name, r in entry["variants"].items():
      gflop = "n/a" if r["xla_gflops_per_example"] is None else f"{r['xla_gflops_per_example']:.3f}"
      rate = "n/a" if r["gflops_per_s"] is None else f"{r['gflops_per_s']:.1f}"
      share = "n/a" if r["share_of_matmul_rate"] is None else f"{r['share_of_matmul_rate']:.0%}"
      spread = f"({r['examples_per_s_min']:.0f}-{r['examples_per_s_max']:.0f})"
      lines.append(f"{program:<8}{name:<10}{r['examples_per_s']:>8.1f}{spread:>14}"
                   f"{r['cpu_ms_per_example']:>11.2f}{gflop:>10}{rate:>9}{share:>11}"
                   f"{r['checkpoint_blocking_s']:>6.2f}/{r['checkpoint_written_s']:<6.2f}")
    lines.append(f"{program:<8}speedup {entry['speedup_median']:.2f}x (paired, min-max "
                 f"{entry['speedup_min']:.2f}-{entry['speedup_max']:.2f}); matmul "
                 f"{'x'.join(map(str, MATMUL_SHAPE))} {entry['matmul_gflops_per_s']:.1f} GFLOP/s")
  load = report["host"]
  lines.append("ckpt s: one checkpoint, seconds the loop waits for it / until it is written")
  lines.append(f"load average {', '.join(f'{x:.2f}' for x in load['loadavg_start'])} -> "
               f"{', '.join(f'{x:.2f}' for x in load['loadavg'])}")
  return "\n".join(lines)
