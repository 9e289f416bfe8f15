"""Example plugin: one selection rule for training and inference (no Gumbel noise)."""

import jax
import jax.numpy as jnp

from scanformer_jax import selection


@selection.train_rule("noiseless")
def noiseless_train(logits, rng, cfg, scale):
  """[B, N] exactly 0/1 in value, gradient of sigmoid(logits / tau)."""
  del rng, scale
  soft = jax.nn.sigmoid(logits.astype(jnp.float32) / cfg.tau)
  return (soft > 0.5).astype(jnp.float32) + (soft - jax.lax.stop_gradient(soft))


@selection.rule("noiseless")
def noiseless_inference(candidates, scores, cfg, scale):
  """The children of taken parents whose logit is positive."""
  del cfg, scale
  return candidates & (scores > 0)
