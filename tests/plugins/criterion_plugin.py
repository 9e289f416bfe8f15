"""Example plugin: an early-exit criterion (stop once the box centre settles)."""

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from scanformer_jax import early_exit


@early_exit.register("centre_settled")
@dataclasses.dataclass(frozen=True)
class CentreSettledCriterion(early_exit.ExitCriterion):
  """Stop when the box centre moved less than `threshold` since the last scale."""
  grid: ClassVar[tuple[float, ...]] = (0.01, 0.02, 0.05)

  def stop(self, signals):
    if signals.scale == 0:
      return jnp.zeros(signals.boxes.shape[0], bool)
    boxes = jnp.asarray(signals.boxes)  # [B, s+1, 4]
    moved = jnp.abs(boxes[:, -1, :2] - boxes[:, -2, :2]).max(-1)  # [B]
    return moved < self.threshold
