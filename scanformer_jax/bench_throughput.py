"""Eval-batch throughput of a trained run: dense vs sparse, timed side by side.

`scanformer bench --throughput --workdir W [--split S] [--steps N]` compiles three
eval steps of the run's model and times them on the same device batches of a split
(the first `evaluate.TIMED_BATCHES`, already on the device, so the data pipeline is
left out):
  dense     every patch of every scale;
  bucketed  the run's capacity buckets, one bucket per batch (its neediest row's);
  grouped   the run's buckets in row groups of `model.capacity_group_rows` (what
            eval runs).
The modes alternate pass by pass, `steps` passes each, so background load on a
shared host hits them alike; the fastest pass of each mode is its samples/s (the
median is reported too, and `paired_speedup`: the median over rounds of dense seconds /
the mode's seconds, with its spread, `timing.paired_ratios`). Next to it, the FLOPs
(`evaluate.gflops_report`): `realised` is the grouped speedup over dense divided by
the dense / kept FLOPs ratio, the share of the selection's saving the program turns
into speed (the demo's target: 0.75).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from scanformer_jax import timing

MODES = ("dense", "bucketed", "grouped")


def run_throughput(workdir: str, split: Optional[str] = None, steps: int = 7) -> dict:
  """The report (JSON-able) of dense / bucketed / grouped eval steps of `workdir`."""
  import jax  # pylint: disable=g-import-not-at-top

  from scanformer_jax import (evaluate, sharding,  # pylint: disable=g-import-not-at-top
                              workdir as workdir_lib)
  from scanformer_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from scanformer_jax.eval_step import EvalStep  # pylint: disable=g-import-not-at-top
  config = workdir_lib.load_config(workdir)
  run = workdir_lib.load_for_inference(workdir, config, None, config.mesh)  # Every device.
  model = run.config.model
  if model.capacity_buckets is None:
    raise UserError(f"{workdir} has no model.capacity_buckets: run `scanformer calibrate "
                    f"--workdir {workdir}` first")
  split = split or run.config.data.eval_splits[0]
  batches = evaluate.first_device_batches(run.config, split, run.mesh)
  if not batches:
    raise UserError(f"split {split!r} has no samples; pass --split")
  configs = {"dense": (model, "dense"),
             "bucketed": (model.replace(capacity_group_rows=None), "sparse"),
             "grouped": (model, "sparse")}
  steps_by_mode, outputs, compile_s = {}, {}, {}
  for mode, (cfg, path) in configs.items():
    step = EvalStep(cfg, run.mesh, run.param_shardings, mode=path)
    compile_s[mode], first = timing.timed_pass(
        lambda step=step: [step(run.params, batch) for batch in batches])
    outputs[mode] = sharding.fetch(first)
    steps_by_mode[mode] = step
  times, _ = timing.alternating_passes(
      {mode: lambda step=steps_by_mode[mode]: [step(run.params, b) for b in batches]
       for mode in MODES}, steps)
  rows = sum(int(np.asarray(b["valid"]).size) for b in outputs["dense"])
  valid_rows = sum(int(np.asarray(b["valid"]).sum()) for b in outputs["dense"])
  report_modes = {}
  for mode in MODES:
    path = configs[mode][1]
    cat = {k: np.concatenate([np.asarray(o[k]) for o in outputs[mode]])
           for k in ("text_len_run", "text_len", "capacity", "taken", "valid")}
    keep = cat["valid"].astype(bool)
    flops = evaluate.gflops_report(configs[mode][0], {k: v[keep] for k, v in cat.items()}, path)
    report_modes[mode] = {
        "samples_per_s": rows / min(times[mode]),
        "median_samples_per_s": rows / float(np.median(times[mode])),
        "compile_and_first_pass_s": compile_s[mode],
        "mean_capacity": cat["capacity"][keep].mean(0).tolist(), **flops}
  dense = report_modes["dense"]
  for mode in MODES:
    entry = report_modes[mode]
    entry["speedup"] = entry["samples_per_s"] / dense["samples_per_s"]
    entry["median_speedup"] = entry["median_samples_per_s"] / dense["median_samples_per_s"]
    # Per round, this mode beside the dense pass of the same round.
    entry["paired_speedup"] = timing.paired_ratios(times["dense"], times[mode])
  grouped = report_modes["grouped"]
  kept_ratio = grouped["gflops_dense"] / grouped["gflops_kept"]
  return {
      "workdir": workdir, "step": run.step, "split": split, "passes": steps,
      "batches": len(batches), "batch_size": rows // len(batches), "samples": valid_rows,
      "devices": run.mesh.size, "capacity_group_rows": model.capacity_group_rows,
      "capacity_buckets": [list(b) for b in model.capacity_buckets],
      "modes": report_modes, "kept_flops_ratio": kept_ratio,
      "as_run_flops_ratio": dense["gflops_as_run"] / grouped["gflops_as_run"],
      "realised": grouped["speedup"] / kept_ratio,
      "host": {"backend": jax.default_backend(), "cpu_count": os.cpu_count(),
               "loadavg": list(os.getloadavg())}}


def format_throughput(report: dict) -> str:
  """A readable table of one `run_throughput` report."""
  lines = [f"scanformer bench --throughput: {report['workdir']} (step {report['step']}), "
           f"split {report['split']}: {report['batches']} batches of {report['batch_size']} "
           f"on {report['devices']} device(s), fastest of {report['passes']} alternating passes",
           f"buckets {report['capacity_buckets']}, row groups of "
           f"{report['capacity_group_rows']} rows",
           f"{'mode':<10}{'samples/s':>11}{'median':>9}{'speedup':>9}{'GFLOPs run':>12}"
           "  mean slots per scale"]
  for mode in MODES:
    r = report["modes"][mode]
    slots = " ".join(f"{c:.1f}" for c in r["mean_capacity"])
    lines.append(f"{mode:<10}{r['samples_per_s']:>11.1f}{r['median_samples_per_s']:>9.1f}"
                 f"{r['speedup']:>8.2f}x{r['gflops_as_run']:>12.4f}  {slots}")
  grouped = report["modes"]["grouped"]
  lines.append(f"GFLOPs kept {grouped['gflops_kept']:.4f}, dense {grouped['gflops_dense']:.4f}: "
               f"kept ratio {report['kept_flops_ratio']:.2f}x, as-run ratio "
               f"{report['as_run_flops_ratio']:.2f}x; grouped speedup "
               f"{grouped['speedup']:.2f}x = {report['realised']:.2f} of the kept ratio")
  if "paired_speedup" in grouped:
    lines.append("grouped over dense per round (median of paired ratios): "
                 + timing.format_spread(grouped["paired_speedup"]))
  return "\n".join(lines)
