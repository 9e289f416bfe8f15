"""Prediction heads: patch selection (after Encoder1) and the box on REG tokens.
The early-exit heads are registry entries (exit_heads.py)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from scanformer_jax.config import ModelConfig
from scanformer_jax.layers import dense, layer_norm


class SelectionHead(nn.Module):
  """LayerNorm + Dense -> one logit per patch: take this patch's children?"""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, N, D] -> [B, N] float32 logits."""
    x = layer_norm(self.cfg, "norm")(x)
    return dense(self.cfg, 1, "logit")(x)[..., 0].astype(jnp.float32)


class HeadMlp(nn.Module):
  """`depth - 1` hidden ReLU layers of width hidden_size, then `out` float32 features.

  The heads' MLP; the transformer layers' GELU MLP is `layers.Mlp`.
  """

  cfg: ModelConfig
  depth: int
  out: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.depth - 1):
      x = nn.relu(dense(self.cfg, self.cfg.hidden_size, f"hidden_{i}")(x))
    return dense(self.cfg, self.out, "out")(x).astype(jnp.float32)


class BoxHead(nn.Module):
  """REG feature -> normalized (cx, cy, w, h) in (0, 1)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, reg: jax.Array) -> jax.Array:
    """reg: [B, D] -> [B, 4]."""
    return jax.nn.sigmoid(HeadMlp(self.cfg, self.cfg.box_head_layers, 4, name="mlp")(reg))
