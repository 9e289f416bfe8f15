"""One optimizer step: dense path with hard Gumbel selection, loss, guarded update.

A step whose loss or gradients are not finite leaves parameters and optimizer state
untouched (`jnp.where` inside the jitted step, no host sync) and bumps
`state.skipped`. Gumbel noise uses `fold_in(state.rng, state.step)`, so a resumed
run draws exactly the noise the uninterrupted one would have.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from scanformer_jax import losses, sharding as sharding_lib
from scanformer_jax.config import LossConfig, ModelConfig
from scanformer_jax.model import ScanFormer
from scanformer_jax.train_state import TrainState

Batch = dict[str, jax.Array]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]


def make_train_step(cfg: ModelConfig, loss_cfg: LossConfig, tx: optax.GradientTransformation,
                    schedules: dict[str, optax.Schedule], select_warmup_steps: int = 0
                    ) -> StepFn:
  """The un-jitted step `(state, batch) -> (state, metrics)`; metrics are scalars.

  For the first `select_warmup_steps` steps every patch is taken (see
  TrainConfig.select_warmup_steps); one compiled program holds both branches.
  """
  model = ScanFormer(cfg)

  def loss_fn(params, batch, rng, take_all):
    def forward(force_taken=None):
      return model.apply({"params": params}, batch["image"], batch["text_ids"],
                         batch["text_mask"], mode="dense", train=True,
                         rngs={"gumbel": rng}, force_taken=force_taken)

    def every_patch():
      b = batch["image"].shape[0]
      return forward(tuple(jnp.ones((b, n), jnp.float32) for n in cfg.num_patches))

    if select_warmup_steps:
      out = jax.lax.cond(take_all, every_patch, forward)
    else:
      out = forward()
    return losses.scanformer_loss(out, batch["box"], batch["valid"], loss_cfg)

  def step(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(state.rng, state.step)
    take_all = state.step < select_warmup_steps
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, rng, take_all)
    grad_norm = optax.tree.norm(grads)  # Global L2 norm (optax.global_norm is deprecated).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    new_state = state.replace(
        step=state.step + 1,
        params=jax.tree.map(keep, params, state.params),
        opt_state=jax.tree.map(keep, opt_state, state.opt_state),
        skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = {"loss": loss, **terms, "grad_norm": grad_norm,
               "skipped": new_state.skipped, "finite": finite.astype(jnp.int32)}
    for name, fn in schedules.items():
      metrics[name] = fn(state.step)
    return new_state, metrics

  return step


def jit_train_step(step: StepFn, state_shardings: Any, mesh: Mesh) -> StepFn:
  """Jitted with the state donated, batch split on the batch axes, metrics replicated."""
  return jax.jit(step,
                 in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
                 donate_argnums=0)
