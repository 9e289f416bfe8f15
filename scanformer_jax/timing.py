"""Timing compiled programs on a shared host: best pass, alternating passes, paired ratios.

On a loaded machine (a 2-core CPU running the data pipeline, or other jobs) the
speed of one program drifts by tens of percent over minutes, and two runs of the
same work can differ by 24 %. Three tools, used by every benchmark (`bench`,
`bench --throughput`, `eval --exit-sweep`):
  best_pass           the fastest of a few passes: the one least disturbed;
  alternating_passes  several programs timed in turn, round by round, so drift
                      hits them alike;
  paired_ratios       the per-round ratios of two alternating programs, summarised
                      by their median with its spread (min, max, quartiles): a
                      speedup measured seconds apart, not minutes.
A "pass" is one call of a function that dispatches its work and returns the results;
the timer waits for every result (`jax.block_until_ready`) before it stops.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np


def timed_pass(run: Callable[[], Any]) -> tuple[float, Any]:
  """(seconds of one `run()` until its results are ready, its result)."""
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  out = jax.block_until_ready(run())
  return time.perf_counter() - start, out


def best_pass(run: Callable[[], Any], passes: int = 3) -> tuple[float, Any]:
  """(fastest of `passes` timed calls of `run()` in seconds, the last call's result)."""
  best, out = float("inf"), None
  for _ in range(passes):
    seconds, out = timed_pass(run)
    best = min(best, seconds)
  return best, out


def alternating_passes(runs: Mapping[str, Callable[[], Any]], passes: int
                       ) -> tuple[dict[str, list[float]], dict[str, Any]]:
  """Times every `runs[name]()` `passes` times, the names in turn in each round, so
  background load hits them alike: ({name: seconds per round}, {name: last result})."""
  wall, _, last = alternating_wall_and_cpu(runs, passes)
  return wall, last


def alternating_wall_and_cpu(runs: Mapping[str, Callable[[], Any]], passes: int
                             ) -> tuple[dict[str, list[float]], dict[str, list[float]],
                                        dict[str, Any]]:
  """`alternating_passes` with this process's CPU seconds of each pass too:
  ({name: wall seconds}, {name: CPU seconds}, {name: last result})."""
  wall: dict[str, list[float]] = {name: [] for name in runs}
  cpu: dict[str, list[float]] = {name: [] for name in runs}
  last: dict[str, Any] = {}
  for _ in range(passes):
    for name, run in runs.items():
      cpu_start = time.process_time()
      seconds, last[name] = timed_pass(run)
      wall[name].append(seconds)
      cpu[name].append(time.process_time() - cpu_start)
  return wall, cpu, last


def spread(values: Sequence[float]) -> dict[str, float]:
  """{"median", "min", "max", "q25", "q75", "n"} of `values`."""
  v = np.asarray(values, np.float64)
  q25, median, q75 = np.percentile(v, [25, 50, 75])
  return {"median": float(median), "min": float(v.min()), "max": float(v.max()),
          "q25": float(q25), "q75": float(q75), "n": int(v.size)}


def paired_ratios(baseline_seconds: Sequence[float], seconds: Sequence[float]
                  ) -> dict[str, float]:
  """The speedup of a program over a baseline timed beside it (`alternating_passes`):
  the per-round ratios baseline / program, as `spread` (median, min, max, quartiles)."""
  base = np.asarray(baseline_seconds, np.float64)
  this = np.asarray(seconds, np.float64)
  if base.shape != this.shape or not base.size:
    raise ValueError(f"paired_ratios needs as many rounds of each, got {base.size} and "
                     f"{this.size}")
  return spread(base / np.maximum(this, 1e-12))


def format_spread(stats: Mapping[str, float], unit: str = "x") -> str:
  """`1.31x (IQR 1.25-1.36, range 1.10-1.40, 7 pairs)`: the median and its spread."""
  return (f"{stats['median']:.2f}{unit} (IQR {stats['q25']:.2f}-{stats['q75']:.2f}, "
          f"range {stats['min']:.2f}-{stats['max']:.2f}, {stats['n']} pairs)")
