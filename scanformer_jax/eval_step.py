"""The jitted evaluation step: sparse (or dense) scan, per-sample, per-scale results.

Compiled once per (config, batch shape): the last, partial batch is padded by the
pipeline (`valid=False`), so every batch has the same shape. Each device runs the
step on its own rows (`sharding.per_device`): every output is per sample, so nothing
crosses devices, and each device groups its own rows into capacity buckets. Outputs
stay per sample so the host can drop padding rows and apply early-exit criteria
afterwards. The slots each row's scale ran with are an output (`capacity`), so the
host can count what the compiled program executed.
"""

from __future__ import annotations

from typing import Any, Optional

import chex
import jax
from jax.sharding import Mesh

from scanformer_jax import forward, sharding as sharding_lib
from scanformer_jax.config import ModelConfig


class EvalStep:
  """`step(params, batch) -> dict` of per-sample arrays.

  max_traces: if set, tracing the step more often raises (`chex.assert_max_traces`;
  tests call `chex.clear_trace_counter()` first, as its counter is global).
  """

  def __init__(self, cfg: ModelConfig, mesh: Mesh, param_shardings: Any,
               max_traces: Optional[int] = None, mode: str = "sparse"):
    self.cfg = cfg
    self.mode = mode
    batch_sh = sharding_lib.batch_sharding(mesh)
    step = sharding_lib.per_device(self._step, mesh, replicated_args=(0,))
    step = step if max_traces is None else chex.assert_max_traces(step, max_traces)
    self._jitted = jax.jit(step, in_shardings=(param_shardings, batch_sh),
                           out_shardings=batch_sh)

  def _step(self, params, batch) -> dict[str, jax.Array]:
    return forward.rows(self.cfg, params, batch, self.mode)

  def __call__(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return self._jitted(params, batch)

  def lower(self, params: Any, batch: Any) -> jax.stages.Lowered:
    """The step lowered for these (possibly abstract) arguments: its HLO and cost."""
    return self._jitted.lower(params, batch)

