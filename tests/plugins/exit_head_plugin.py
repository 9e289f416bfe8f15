"""Example plugin: a learned exit head with its loss, and the criterion reading it."""

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from scanformer_jax import early_exit, exit_heads
from scanformer_jax.heads import HeadMlp


class IouSquaredHead(nn.Module):
  """REG feature [..., D] -> predicted IoU [...] in (0, 1)."""
  cfg: Any

  @nn.compact
  def __call__(self, reg):
    return jax.nn.sigmoid(HeadMlp(self.cfg, 2, 1, name="mlp")(reg)[..., 0])


def squared_error(pred, targets: exit_heads.HeadTargets):
  """sum_s mean_b (pred - stop_gradient(IoU))^2 over valid rows; pred [B, S]."""
  err = (pred - jax.lax.stop_gradient(targets.iou)) ** 2
  return exit_heads.per_scale_sum(err, targets.valid)


exit_heads.register(exit_heads.ExitHead(
    name="iou_sq", module=IouSquaredHead, signal="iou_sq", to_signal=lambda raw: raw,
    loss=squared_error, flops=lambda cfg: exit_heads.mlp_flops(cfg, 2, 1),
    description="IoU regressed with a squared error"))


@early_exit.register("iou_sq")
@dataclasses.dataclass(frozen=True)
class IouSquaredCriterion(early_exit.ExitCriterion):
  """Stop when the iou_sq head predicts at least `threshold`."""
  needs: ClassVar[tuple[str, ...]] = ("iou_sq",)
  grid: ClassVar[tuple[float, ...]] = (0.5, 0.6, 0.7)

  def stop(self, signals):
    return jnp.asarray(signals.iou_sq[:, -1]) >= self.threshold
