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
import jax.numpy as jnp
from jax.sharding import Mesh

from scanformer_jax import box_ops, early_exit, sharding as sharding_lib
from scanformer_jax.config import ModelConfig
from scanformer_jax.model import ScanFormer


class EvalStep:
  """`step(params, batch) -> dict` of per-sample arrays.

  max_traces: if set, tracing the step more often raises (`chex.assert_max_traces`;
  tests call `chex.clear_trace_counter()` first, as its counter is global).
  """

  def __init__(self, cfg: ModelConfig, mesh: Mesh, param_shardings: Any,
               max_traces: Optional[int] = None, mode: str = "sparse"):
    self.cfg = cfg
    self.mode = mode
    self._model = ScanFormer(cfg)
    batch_sh = sharding_lib.batch_sharding(mesh)
    step = sharding_lib.per_device(self._step, mesh, replicated_args=(0,))
    step = step if max_traces is None else chex.assert_max_traces(step, max_traces)
    self._jitted = jax.jit(step, in_shardings=(param_shardings, batch_sh),
                           out_shardings=batch_sh)

  def _step(self, params, batch) -> dict[str, jax.Array]:
    cfg = self.cfg
    out = self._model.apply({"params": params}, batch["image"], batch["text_ids"],
                            batch["text_mask"], mode=self.mode)
    b, text_tokens = batch["text_ids"].shape
    chex.assert_shape(out.boxes, (b, cfg.num_scales, 4))
    result = {
        "boxes": out.boxes,  # [B, S, 4]
        "iou": box_ops.iou_cxcywh(out.boxes, batch["box"][:, None, :]),  # [B, S]
        "taken": jnp.stack([t.sum(-1) for t in out.taken], axis=1).astype(jnp.int32),  # [B,S]
        "num_dropped": out.num_dropped.astype(jnp.int32),  # [B, S]
        "capacity": out.capacity.astype(jnp.int32),  # [B, S] slots run (the row group's bucket)
        "text_len": batch["text_mask"].sum(-1).astype(jnp.int32),  # [B]
        "text_len_run": jnp.full((b,), text_tokens, jnp.int32),  # [B] padded, as run
        "valid": batch["valid"],  # [B]
    }
    taken = result["taken"] + result["num_dropped"]  # [B, S] wanted patches per scale
    fractions = [taken[:, s + 1] / n for s, n in enumerate(cfg.num_patches[1:])]
    # [B, S]: the fraction of scale s+1's patches the selection after s wants (0 last).
    result["wanted_next"] = jnp.stack(fractions + [jnp.zeros((b,))], axis=1)
    result["gt_box"] = batch["box"]  # [B, 4], for the oracle only
    # pred_iou / halt_prob / box_scale [B, S] when the model has the exit head.
    result.update(early_exit.head_signals(out.pred_iou, out.halt_logit, out.box_log_scale))
    return result

  def __call__(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return self._jitted(params, batch)

  def lower(self, params: Any, batch: Any) -> jax.stages.Lowered:
    """The step lowered for these (possibly abstract) arguments: its HLO and cost."""
    return self._jitted.lower(params, batch)

