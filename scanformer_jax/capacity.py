"""Sparse-path capacities: calibrated from the model's own selection, and what they cost.

`scanformer calibrate` runs the full-capacity sparse scan over a split (every wanted
patch gets a slot, so the taken counts are the wanted counts). Per scale it writes
into the run's config.json:
  - `model.capacity`: the `quantile` of wanted patches per sample, rounded up to a
    multiple of `MULTIPLE` (capped at the scale's patch count), for fixed-capacity use;
  - `model.capacity_buckets`: at most `MAX_BUCKETS` slot counts, the last every patch
    (nothing is ever dropped), chosen to minimise the slots the calibration split's
    samples would run if each ran the smallest bucket holding its count
    (`cheapest_buckets`).
Eval and predict then run the bucketed scan in capacity groups (`model.py`): rows
sorted by need, each group of rows in its own bucket.

The bucketed scan is not always the faster program: at batch 1, or for a small
model, its gathers and bucket branches can cost more than the dense scan saves.
So `calibrate` also times both plans on the model's own selection (the split's
first samples), alternating, at batch 1 and at the eval batch (`measure_plans`),
and records the faster one per batch size in `eval.plans` (`Plan`); `eval`,
`predict` and `load()` follow the plan of the batch size nearest theirs
(`plan_for`) and say which ran (`Plan.describe`).

A process that runs only a few forwards pays mostly for getting its program ready:
the bucketed scan holds a branch per bucket, so its compiled program is several
times larger than the dense one and slower to read back from the compilation cache.
At batch 1 `calibrate` also times that (`ready_seconds`), and a caller that knows
how many forwards it will run (`scanformer predict` of one image: one) takes the plan
with the smaller total (`Plan.mode_for`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
from jax.sharding import Mesh

from scanformer_jax import config_io, flops, sharding as sharding_lib
from scanformer_jax.config import ExperimentConfig, ModelConfig

# Slot counts are multiples of this, capped at N_s: the threshold rule takes a
# parent's four children together, so wanted counts are multiples of 4.
MULTIPLE = 4
# Buckets per scale at most: each is a branch compiled into the bucketed scan.
MAX_BUCKETS = 6
CALIBRATION_FILE = "calibration.json"


def round_up(count: float, total: int, multiple: int = MULTIPLE) -> int:
  """`count` rounded up to a multiple of `multiple` (at least one), at most `total`."""
  return int(min(total, max(multiple, math.ceil(count / multiple) * multiple)))


def full_capacity(cfg: ModelConfig) -> ModelConfig:
  """The model with every patch slotted: its taken counts are its wanted counts."""
  return cfg.replace(capacity=None, capacity_buckets=None)


def wanted_counts(cfg: ModelConfig, params: Any, step, batches: Iterable[dict],
                  mesh: Mesh) -> np.ndarray:
  """Wanted patches per sample and scale [N, S] of valid rows, by `step` (an EvalStep of
  `full_capacity(cfg)`) over process-local contract `batches`."""
  from data_pipelines.contract import DEVICE_KEYS  # pylint: disable=g-import-not-at-top
  if step.cfg != full_capacity(cfg):
    raise ValueError("wanted_counts needs an EvalStep of full_capacity(cfg)")
  rows = []
  for batch in batches:
    device_batch = sharding_lib.to_global({k: batch[k] for k in DEVICE_KEYS}, mesh)
    host = sharding_lib.fetch(step(params, device_batch))
    if np.asarray(host["num_dropped"]).any():
      raise AssertionError("a full-capacity scan dropped patches")
    rows.append(np.asarray(host["taken"])[np.asarray(host["valid"], bool)])
  if not rows or not sum(len(r) for r in rows):
    return np.zeros((0, cfg.num_scales), np.int32)
  return np.concatenate(rows)


def cheapest_buckets(counts: np.ndarray, total: int, max_buckets: int = MAX_BUCKETS,
                     multiple: int = MULTIPLE) -> tuple[int, ...]:
  """At most `max_buckets` slot counts, ascending, the last `total`, minimising the
  summed slots of `counts` [N] when each count runs the smallest bucket holding it.

  Exact, by dynamic programming over the candidates (multiples of `multiple` and
  `total`): best[j, m] is the least summed slots of the counts up to candidate j with
  m buckets, the largest being candidate j.
  """
  counts = np.asarray(counts)
  candidates = sorted({round_up(c, total, multiple) for c in range(total + 1)})  # Ends at total.
  # How many counts each candidate holds; the difference of two: those between them.
  at_most = np.array([(counts <= c).sum() for c in candidates], np.float64)  # [K]
  k = len(candidates)
  best = np.full((k, max_buckets + 1), np.inf)
  previous = np.full((k, max_buckets + 1), -1)
  for j, c in enumerate(candidates):
    best[j, 1] = at_most[j] * c
    for m in range(2, max_buckets + 1):
      for i in range(j):
        cost = best[i, m - 1] + (at_most[j] - at_most[i]) * c
        if cost < best[j, m]:
          best[j, m], previous[j, m] = cost, i
  j, m = k - 1, int(np.argmin(best[k - 1, 1:])) + 1
  chosen = []
  while j >= 0:
    chosen.append(candidates[j])
    j, m = previous[j, m], m - 1
  return tuple(sorted(chosen))


def calibrate(counts: np.ndarray, num_patches: Sequence[int], quantile: float,
              max_buckets: int = MAX_BUCKETS,
              multiple: int = MULTIPLE) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
  """(capacity, capacity_buckets) from wanted counts [N, S].

  capacity[s]: the `quantile` of counts[:, s], rounded up (`round_up`); buckets[s]:
  `cheapest_buckets` of counts[:, s]. Scale 0 takes every patch.
  """
  counts = np.asarray(counts)
  if counts.ndim != 2 or counts.shape[1] != len(num_patches) or not len(counts):
    raise ValueError(f"counts must be [N > 0, {len(num_patches)}], got {counts.shape}")
  if not 0.0 < quantile <= 1.0:
    raise ValueError(f"quantile must be in (0, 1], got {quantile}")
  capacity, buckets = [num_patches[0]], [(num_patches[0],)]
  for s in range(1, len(num_patches)):
    total = num_patches[s]
    capacity.append(round_up(np.quantile(counts[:, s], quantile, method="higher"), total,
                             multiple))
    buckets.append(cheapest_buckets(counts[:, s], total, max_buckets, multiple))
  return tuple(capacity), tuple(buckets)


def summary(counts: np.ndarray, num_patches: Sequence[int], capacity: Sequence[int],
            buckets: Sequence[Sequence[int]], quantile: float) -> dict[str, Any]:
  """What `calibrate` saw and chose, per scale (JSON-able)."""
  counts = np.asarray(counts)
  return {
      "count": int(len(counts)), "quantile": quantile,
      "num_patches": list(num_patches), "capacity": list(capacity),
      "capacity_buckets": [list(b) for b in buckets],
      "wanted_mean": counts.mean(0).tolist(), "wanted_max": counts.max(0).tolist(),
      "overflow_fraction_at_capacity": float((counts > np.asarray(capacity)).any(1).mean()),
  }


def with_capacities(config: ExperimentConfig, capacity: Sequence[int],
                    buckets: Sequence[Sequence[int]]) -> ExperimentConfig:
  """`config` with model.capacity and model.capacity_buckets set (validated)."""
  model = config.model.replace(capacity=tuple(capacity),
                               capacity_buckets=tuple(tuple(b) for b in buckets))
  return config.replace(model=model)


def write_capacities(config_path: str, capacity: Sequence[int],
                     buckets: Sequence[Sequence[int]],
                     plans: Sequence["Plan"] = ()) -> ExperimentConfig:
  """Sets the capacities and the measured plans (`eval.plans`; none: the old ones are
  dropped, they timed other buckets) in the config.json at `config_path`
  (atomically); returns it.

  Only model.capacity, model.capacity_buckets and eval.plans change: none changes a
  parameter shape, so the checkpoints still restore and `train` resumes.
  """
  config = with_capacities(config_io.load_json(config_path), capacity, buckets)
  config = with_plans(config, plans)
  config_io.save_json(config, config_path)
  return config


def flops_as_run(cfg: ModelConfig, text_len, capacities) -> np.ndarray:
  """FLOPs per sample the compiled sparse program executed with `capacities` [..., S]
  (the slots each scale ran with, e.g. eval's per-sample bucket sizes).

  `flops.sparse_flops_as_run` plus the bucketed scan's padding: each scale's keys are
  padded to its largest bucket (`cfg.max_capacities`), and every later block attends
  to that padding (4 * T * pad * D FLOPs per layer).
  """
  caps = np.asarray(capacities, np.float64)
  if caps.shape[-1] != cfg.num_scales:
    raise ValueError(f"capacities needs a last axis of {cfg.num_scales}, got {caps.shape}")
  per_scale = [caps[..., s] for s in range(cfg.num_scales)]
  total = flops.sparse_flops_as_run(cfg, text_len, per_scale)
  tokens = flops.sparse_tokens_as_run(cfg, per_scale)
  pad = 0.0
  for s in range(cfg.num_scales):
    total = total + 4.0 * cfg.num_layers * tokens[s] * pad * cfg.hidden_size
    pad = pad + (cfg.max_capacities[s] - per_scale[s])
  return np.asarray(total)


def calibration_path(workdir: str) -> str:
  return os.path.join(workdir, CALIBRATION_FILE)


# ------------------------------------------------------------ the plan per batch size
PLAN_MODES = ("sparse", "dense")
# Rounds of alternating timing per batch size: each round runs both plans once.
PLAN_ROUNDS = 7
# Samples timed one by one at batch 1 (a pass runs each once): several, because each
# sample's selection picks its own buckets.
SINGLE_SAMPLES = 8
# Eval batches a pass runs at the eval batch size.
PLAN_BATCHES = 2


@dataclasses.dataclass(frozen=True)
class Plan:
  """The plan run at `batch_size`: "sparse" (the bucketed scan) or "dense", with the
  milliseconds per forward of that batch size `calibrate` measured for each (medians
  of paired rounds) and, when measured, the seconds a new process takes to get each
  program ready (`ready_seconds`)."""
  batch_size: int
  mode: str
  sparse_ms: float
  dense_ms: float
  sparse_ready_s: Optional[float] = None
  dense_ready_s: Optional[float] = None

  def mode_for(self, calls: Optional[int] = None) -> str:
    """The mode for a process that runs `calls` forwards of this batch size: the one
    with the smaller ready time + calls x time per forward when both ready times are
    known; else (or calls None: unknown, e.g. a server) the faster per forward."""
    if calls is None or self.sparse_ready_s is None or self.dense_ready_s is None:
      return self.mode
    sparse = self.sparse_ready_s + calls * self.sparse_ms / 1e3
    dense = self.dense_ready_s + calls * self.dense_ms / 1e3
    return "dense" if dense < sparse else "sparse"

  def describe(self, calls: Optional[int] = None) -> str:
    """`plan: dense (bucketed sparse measured 26.6 ms vs dense 9.3 ms at batch 1)`; when
    the forwards to run decide against the faster per forward, says so."""
    mode = self.mode_for(calls)
    line = (f"plan: {mode} (bucketed sparse measured {self.sparse_ms:.1f} ms vs dense "
            f"{self.dense_ms:.1f} ms at batch {self.batch_size}")
    if mode != self.mode:
      line += (f"; for {calls} forward{'s' if calls != 1 else ''} the program's start "
               f"decides: sparse ready in {self.sparse_ready_s:.2f} s vs dense "
               f"{self.dense_ready_s:.2f} s")
    return line + ")"

  def as_tuple(self) -> tuple:
    if self.sparse_ready_s is None or self.dense_ready_s is None:
      return (self.batch_size, self.mode, self.sparse_ms, self.dense_ms)
    return (self.batch_size, self.mode, self.sparse_ms, self.dense_ms, self.sparse_ready_s,
            self.dense_ready_s)


def plans_of(config: ExperimentConfig) -> list[Plan]:
  """`eval.plans` as `Plan`s; a UserError naming the entry if one is malformed."""
  from scanformer_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  plans = []
  for i, entry in enumerate(config.eval.plans):
    plan = Plan(*entry) if len(entry) in (4, 6) else None
    if plan is None or plan.mode not in PLAN_MODES or plan.batch_size < 1:
      raise UserError(f"eval.plans[{i}]={tuple(entry)!r}: expected (batch size >= 1, "
                      f"{' or '.join(PLAN_MODES)}, sparse ms, dense ms[, sparse ready s, "
                      "dense ready s]); rerun `scanformer calibrate` to measure it again")
    plans.append(plan)
  return plans


def with_plans(config: ExperimentConfig, plans: Sequence[Plan]) -> ExperimentConfig:
  """`config` with eval.plans set to `plans` (sorted by batch size)."""
  entries = tuple(p.as_tuple() for p in sorted(plans, key=lambda p: p.batch_size))
  return config.replace(eval=dataclasses.replace(config.eval, plans=entries))


def plan_for(plans: Sequence[Plan], batch_size: int) -> Optional[Plan]:
  """The recorded plan whose batch size is nearest `batch_size` (in log2; a tie goes to
  the smaller one), or None when none was recorded."""
  if not plans:
    return None
  return min(plans, key=lambda p: (abs(math.log2(p.batch_size) - math.log2(batch_size)),
                                   p.batch_size))


def mode_for(plans: Sequence[Plan], batch_size: int, calls: Optional[int] = None
             ) -> tuple[str, Optional[str]]:
  """The scan to run at `batch_size` and the line saying why: the mode of the recorded
  plan nearest it (`plan_for`) for `calls` forwards (`Plan.mode_for`; None: unknown)
  with `Plan.describe`, else ("sparse", None)."""
  plan = plan_for(plans, batch_size)
  if plan is None:
    return "sparse", None
  return plan.mode_for(calls), plan.describe(calls)


def choose_plan(batch_size: int, seconds: Mapping[str, Sequence[float]],
                calls: int = 1) -> Plan:
  """The faster of the two plans by median seconds per pass of `calls` forwards (a tie
  keeps sparse), with the milliseconds per forward."""
  sparse = round(float(np.median(seconds["sparse"])) * 1e3 / calls, 3)  # ms, to the µs
  dense = round(float(np.median(seconds["dense"])) * 1e3 / calls, 3)
  return Plan(batch_size, "dense" if dense < sparse else "sparse", sparse, dense)


PlanTimer = Callable[[int, Mapping[str, Callable[[], Any]]], Mapping[str, Sequence[float]]]
# Times each program is made ready by `ready_seconds` (the fastest counts): once, as the
# sparse and dense programs differ several-fold and each round lowers both afresh
# (seconds of tracing in `calibrate`).
READY_ROUNDS = 1


def ready_seconds(lowerings: Mapping[str, Callable[[], Any]],
                  rounds: int = READY_ROUNDS) -> dict[str, float]:
  """Seconds to get each program ready as a new process does (`lowerings[mode]()`
  returns a freshly lowered program; its `.compile()` is timed): read back from the
  compilation cache when it is on (the programs have run once already), else
  compiled. The fastest of `rounds`, alternating the modes."""
  best = {mode: math.inf for mode in lowerings}
  for _ in range(rounds):
    for mode, lower in lowerings.items():
      lowered = lower()
      start = time.perf_counter()
      lowered.compile()
      best[mode] = min(best[mode], time.perf_counter() - start)
  return {mode: round(t, 3) for mode, t in best.items()}


def paired_timer(batch_size: int, runs: Mapping[str, Callable[[], Any]],
                 rounds: int = PLAN_ROUNDS) -> dict[str, list[float]]:
  """Seconds per pass of each run: one untimed call each (compilation), then `rounds`
  rounds alternating them (`timing.alternating_passes`: drift hits both alike)."""
  import jax  # pylint: disable=g-import-not-at-top
  from scanformer_jax import timing  # pylint: disable=g-import-not-at-top
  del batch_size
  for run in runs.values():
    jax.block_until_ready(run())
  seconds, _ = timing.alternating_passes(runs, rounds)
  return seconds


def measure_plans(cfg: ModelConfig, params: Any, mesh: Mesh, param_shardings: Any,
                  batches: Sequence[dict], timer: Optional[PlanTimer] = None,
                  progress: Callable[[str], None] = lambda _: None) -> list[Plan]:
  """Times the bucketed sparse scan of `cfg` (calibrated) against the dense scan on
  the model's own selection, at batch 1 and at the batch size of `batches` (eval
  batches, process-local contract batches, the first `PLAN_BATCHES` used); returns
  the faster `Plan` of each.

  Batch 1 runs what `predict` runs: one device, the jitted forward, each of the
  first `SINGLE_SAMPLES` valid samples alone. The eval batch runs the `EvalStep`
  that `eval` runs, on `mesh`. `timer(batch_size, {"sparse": run, "dense": run})`
  gives the seconds per pass of each (default `paired_timer`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from data_pipelines.contract import DEVICE_KEYS  # pylint: disable=g-import-not-at-top
  from scanformer_jax import forward  # pylint: disable=g-import-not-at-top
  from scanformer_jax.eval_step import EvalStep  # pylint: disable=g-import-not-at-top
  timer = timer or paired_timer
  batches = list(batches)[:PLAN_BATCHES]
  if not batches:
    return []
  plans = []
  eval_batch = int(np.shape(batches[0]["text_ids"])[0]) * jax.process_count()
  singles = [{k: np.asarray(b[k])[i:i + 1] for k in DEVICE_KEYS}
             for b in batches for i in np.nonzero(np.asarray(b["valid"], bool))[0]]
  singles = singles[:SINGLE_SAMPLES]
  if singles and jax.process_count() == 1:
    device = jax.local_devices()[0]
    one_params = jax.device_put(params, device)
    on_device = [jax.device_put(s, device) for s in singles]
    runs, lowerings = {}, {}
    for mode in PLAN_MODES:
      fn = jax.jit(lambda p, b, mode=mode: forward.rows(cfg, p, b, mode))
      runs[mode] = lambda fn=fn: [fn(one_params, b) for b in on_device]
      # A new function each time: jax's in-memory caches do not answer, as in a new process.
      lowerings[mode] = lambda mode=mode: jax.jit(
          lambda p, b: forward.rows(cfg, p, b, mode)).lower(one_params, on_device[0])
    progress("timing the bucketed sparse and the dense plan at batch 1")
    plan = choose_plan(1, timer(1, runs), calls=len(on_device))
    ready = ready_seconds(lowerings)
    plans.append(dataclasses.replace(plan, sparse_ready_s=ready["sparse"],
                                     dense_ready_s=ready["dense"]))
  if eval_batch > 1:
    device_batches = [sharding_lib.to_global({k: b[k] for k in DEVICE_KEYS}, mesh)
                      for b in batches]
    runs = {}
    for mode in PLAN_MODES:
      step = EvalStep(cfg, mesh, param_shardings, mode=mode)
      runs[mode] = lambda step=step: [step(params, b) for b in device_batches]
    progress(f"timing the bucketed sparse and the dense plan at batch {eval_batch}")
    plans.append(choose_plan(eval_batch, timer(eval_batch, runs),
                             calls=len(device_batches)))
  return plans
