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
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Sequence

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
                     buckets: Sequence[Sequence[int]]) -> ExperimentConfig:
  """Sets the capacities in the config.json at `config_path` (atomically); returns it.

  Only model.capacity and model.capacity_buckets change: neither changes a parameter
  shape, so the checkpoints still restore and `train` resumes.
  """
  config = with_capacities(config_io.load_json(config_path), capacity, buckets)
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
