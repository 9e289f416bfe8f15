"""Learned early-exit heads, one registry entry each (an extension point).

An exit head reads each scale's REG feature and gives early-exit criteria a signal
(`early_exit.py`): "how good is this scale's box?". One `ExitHead` entry carries
everything about it:
  - `module`: the flax module class, built as `module(cfg, name=entry.name)`, mapping
    REG features [..., D] to its raw output [...] or [..., k] (float32);
  - `signal`: the key criteria read (`ScaleSignals.<signal>`, the eval step's output)
    and `to_signal`, raw output [B, S, ...] -> signal [B, S];
  - `loss`: its training term (a scalar) from `HeadTargets`, weighted by `weight`
    (`loss.exit_head_weights` overrides it by name);
  - `flops`: its forward FLOPs per REG token (the GFLOPs reports count it).
A model switches heads on by name (`model.exit_heads=("halt",)`); their parameters
live at `params["exit_heads"][name]` and train at the full learning rate. The heads
read stop_gradient(REG) when `model.exit_heads_stop_gradient`, so their losses train
the heads only.

A fork adds a head with one file that calls `register(ExitHead(...))`, loaded with
`--plugin FILE` (plugins.py), and names it in `model.exit_heads`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from scanformer_jax.heads import HeadMlp


@flax.struct.dataclass
class HeadTargets:
  """What a head's loss may read (float32; the box and IoU are stop-gradient)."""
  boxes: jax.Array  # [B, S, 4] normalized (cx, cy, w, h), the box head's
  iou: jax.Array    # [B, S] IoU of each scale's box with the ground truth
  gt_box: jax.Array  # [B, 4]
  valid: jax.Array   # [B] bool: padding rows weigh nothing


@dataclasses.dataclass(frozen=True)
class ExitHead:
  """One learned exit head (module docstring)."""
  name: str
  module: type                                      # nn.Module class, `module(cfg, name=...)`
  signal: str
  to_signal: Callable[[jax.Array], jax.Array]       # raw [B, S, ...] -> [B, S]
  loss: Callable[[jax.Array, HeadTargets], jax.Array]  # (raw [B, S, ...], targets) -> []
  flops: Callable[[Any], float]                     # cfg -> forward FLOPs per REG token
  weight: float = 1.0
  description: str = ""


_REGISTRY: dict[str, ExitHead] = {}


def register(head: ExitHead) -> ExitHead:
  """Adds `head` under `head.name`; a second head with the name or signal is an error."""
  if head.name in _REGISTRY:
    raise ValueError(f"exit head {head.name!r} is registered twice")
  for other in _REGISTRY.values():
    if other.signal == head.signal:
      raise ValueError(f"exit heads {other.name!r} and {head.name!r} both give the signal "
                       f"{head.signal!r}")
  _REGISTRY[head.name] = head
  return head


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str) -> ExitHead:
  if name not in _REGISTRY:
    raise ValueError(f"unknown exit head {name!r}; known: {', '.join(names())} (a plugin "
                     "registers more: --plugin FILE)")
  return _REGISTRY[name]


def providing(signal: str) -> ExitHead | None:
  """The registered head that gives `signal`, or None."""
  return next((h for h in _REGISTRY.values() if h.signal == signal), None)


def signals(cfg) -> tuple[str, ...]:
  """The signal keys a model with ModelConfig `cfg` outputs, in `cfg.exit_heads` order."""
  return tuple(get(name).signal for name in cfg.exit_heads)


def masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean of x [B] over valid rows (0 when there are none)."""
  weight = valid.astype(jnp.float32)
  return jnp.sum(x * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def per_scale_sum(per_sample: jax.Array, valid: jax.Array) -> jax.Array:
  """sum_s mean_b over valid rows of per_sample [B, S]."""
  return sum(masked_mean(per_sample[:, s], valid) for s in range(per_sample.shape[1]))


def mlp_flops(cfg, depth: int, out: int) -> float:
  """Forward FLOPs of `HeadMlp(cfg, depth, out)` on one token (2 per multiply-add;
  biases and activations not counted, as flops.py counts the other layers)."""
  d = cfg.hidden_size
  return 2.0 * (d * d * (depth - 1) + d * out)


# ------------------------------------------------------------------- built-in heads
class IouHead(nn.Module):
  """REG feature -> predicted IoU of this scale's box."""
  cfg: Any

  @nn.compact
  def __call__(self, reg: jax.Array) -> jax.Array:
    """reg: [..., D] -> [...] in (0, 1)."""
    return jax.nn.sigmoid(HeadMlp(self.cfg, 2, 1, name="mlp")(reg)[..., 0])


class HaltHead(nn.Module):
  """REG feature -> logit of "this scale's box is already correct" (IoU >= 0.5)."""
  cfg: Any

  @nn.compact
  def __call__(self, reg: jax.Array) -> jax.Array:
    """reg: [..., D] -> [...] float32 logit."""
    return HeadMlp(self.cfg, 2, 1, name="mlp")(reg)[..., 0]


class BoxUncertaintyHead(nn.Module):
  """REG feature -> log of a Laplace scale per box coordinate (trained by its NLL)."""
  cfg: Any

  @nn.compact
  def __call__(self, reg: jax.Array) -> jax.Array:
    """reg: [..., D] -> [..., 4] float32 log-scales, clipped to a sane range."""
    return jnp.clip(HeadMlp(self.cfg, 2, 4, name="mlp")(reg), -10.0, 5.0)


def iou_l1_loss(pred_iou: jax.Array, t: HeadTargets) -> jax.Array:
  """sum_s mean_b |pred_iou - stop_gradient(IoU)|; pred_iou [B, S]."""
  err = jnp.abs(pred_iou.astype(jnp.float32) - jax.lax.stop_gradient(t.iou))
  return per_scale_sum(err, t.valid)


def halt_bce_loss(halt_logit: jax.Array, t: HeadTargets, correct_iou: float = 0.5
                  ) -> jax.Array:
  """sum_s mean_b BCE(halt_logit, IoU >= correct_iou): "is this box already right?"."""
  target = jax.lax.stop_gradient((t.iou >= correct_iou).astype(jnp.float32))
  bce = optax.sigmoid_binary_cross_entropy(halt_logit.astype(jnp.float32), target)
  return per_scale_sum(bce, t.valid)


def laplace_nll_loss(log_scale: jax.Array, t: HeadTargets) -> jax.Array:
  """sum_s mean_b sum_c [log(2 b) + |sg(box) - gt| / b], b = exp(log_scale) [B, S, 4]."""
  err = jnp.abs(jax.lax.stop_gradient(t.boxes.astype(jnp.float32))
                - t.gt_box[:, None, :].astype(jnp.float32))  # [B, S, 4]
  log_scale = log_scale.astype(jnp.float32)
  nll = (jnp.log(2.0) + log_scale + err * jnp.exp(-log_scale)).sum(-1)  # [B, S]
  return per_scale_sum(nll, t.valid)


register(ExitHead(
    name="iou", module=IouHead, signal="pred_iou", to_signal=lambda raw: raw,
    loss=iou_l1_loss, flops=lambda cfg: mlp_flops(cfg, 2, 1),
    description="the IoU head: predicted IoU of each scale's box"))
register(ExitHead(
    name="halt", module=HaltHead, signal="halt_prob", to_signal=jax.nn.sigmoid,
    loss=halt_bce_loss, flops=lambda cfg: mlp_flops(cfg, 2, 1),
    description="the halting head: probability that each scale's box is correct"))
register(ExitHead(
    name="uncertainty", module=BoxUncertaintyHead, signal="box_scale",
    to_signal=lambda raw: jnp.exp(raw).mean(-1), loss=laplace_nll_loss,
    flops=lambda cfg: mlp_flops(cfg, 2, 4),
    description="the uncertainty head: Laplace scale of the box coordinates"))
