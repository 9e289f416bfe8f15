"""Optimizer: global-norm clipping, then AdamW with warmup + cosine decay, with a
lower learning rate for the (pretrained) backbone than for ScanFormer's new parts.

The groups follow the parameter tree: `params["backbone"]` (ViLT's, model.Backbone)
trains at `backbone_learning_rate`; everything beside it (what ScanFormer adds: REG,
scale and constant tokens, the heads, any exit head a plugin registers) at
`learning_rate`. Weight decay applies to matrices only (not biases, norms, vectors).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from scanformer_jax.config import OptimConfig
from scanformer_jax.model import BACKBONE


GROUPS = ("new", BACKBONE)


def param_labels(params: Any) -> Any:
  """Same tree as `params` with its group ("new" or "backbone") at every leaf."""
  if not isinstance(params, dict) and not hasattr(params, "items"):
    raise TypeError("params must be a dict keyed by top-level module name")
  return {name: jax.tree.map(lambda _, group=(BACKBONE if name == BACKBONE else "new"): group,
                             subtree)
          for name, subtree in params.items()}


def _decay_mask(params: Any) -> Any:
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def schedule(peak: float, cfg: OptimConfig, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `peak`, then cosine to `peak * end_lr_fraction`."""
  warmup = min(cfg.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=peak * cfg.end_lr_fraction)


def make_optimizer(cfg: OptimConfig, num_steps: int
                   ) -> tuple[optax.GradientTransformation, dict[str, Callable]]:
  """The transformation and its schedules {"lr": new params, "lr_backbone": backbone}."""
  schedules = {
      "lr": schedule(cfg.learning_rate, cfg, num_steps),
      "lr_backbone": schedule(cfg.backbone_learning_rate, cfg, num_steps),
  }

  def adamw(lr: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                       mask=_decay_mask)

  parts = []
  if cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  learning_rates = {"new": schedules["lr"], BACKBONE: schedules["lr_backbone"]}
  parts.append(optax.multi_transform(
      {group: adamw(lr) for group, lr in learning_rates.items()}, param_labels))
  return optax.chain(*parts), schedules
