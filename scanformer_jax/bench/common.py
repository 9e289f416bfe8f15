"""What every benchmark shares: presets at a chosen sparsity, results, host facts."""

from __future__ import annotations

import dataclasses
import os
import platform
from typing import Optional

MODELS = ("tiny", "vilt_b32")
MODES = ("dense", "sparse")


@dataclasses.dataclass
class ModeResult:
  mode: str
  compile_s: float
  median_ms: float
  samples_per_s: float
  gflops_per_sample: float        # analytic, as run
  xla_gflops_per_sample: Optional[float]  # XLA cost analysis of the compiled program
  median_cpu_ms: float            # process CPU time per batch (all threads): robust to load
  step_ms: list


def keep_counts(num_patches: tuple[int, ...], keep_ratio: float) -> tuple[int, ...]:
  """Patches kept per scale: all at scale 0, round(R * N_s) at s >= 1 (at least 1)."""
  return (num_patches[0],) + tuple(max(1, int(round(keep_ratio * n))) for n in num_patches[1:])


def bench_config(model: str, keep_ratio: float, dtype: str):
  """The preset with `select_topk` and `capacity` set to the kept counts."""
  from scanformer_jax.config import ModelConfig
  base = getattr(ModelConfig, model)(dtype=dtype)
  counts = keep_counts(base.num_patches, keep_ratio)
  return base.replace(select_topk=counts, capacity=counts)


def xla_flops(compiled) -> Optional[float]:
  """Total FLOPs of a compiled program per XLA (dict, or list of dicts in some versions)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Not every backend implements it.
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None




def host_info(load_start: list) -> dict:
  """Backend, device and load facts stored with every report."""
  import jax  # pylint: disable=g-import-not-at-top
  return {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
          "cpu_count": os.cpu_count(), "loadavg_start": load_start,
          "loadavg": list(os.getloadavg()),
          "jax": jax.__version__, "python": platform.python_version()}
