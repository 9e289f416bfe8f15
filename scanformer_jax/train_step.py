"""One optimizer step: hard Gumbel selection, loss, guarded update.

`train.path` picks the forward: "dense" (every patch a token) or "sparse" (the
taken patches in `train.sparse_slots` slots; the same loss and gradients, model.py
says why). The sparse step reports `dropped_s<k>`: patches of scale k in the batch
that Gumbel took but the capacity could not hold (replaced instead).

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
from scanformer_jax.config import LossConfig, ModelConfig, TrainConfig
from scanformer_jax.errors import UserError
from scanformer_jax.model import ScanFormer
from scanformer_jax.train_state import TrainState

Batch = dict[str, jax.Array]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]


def make_train_step(cfg: ModelConfig, loss_cfg: LossConfig, tx: optax.GradientTransformation,
                    schedules: dict[str, optax.Schedule],
                    train_cfg: TrainConfig = TrainConfig()) -> StepFn:
  """The un-jitted step `(state, batch) -> (state, metrics)`; metrics are scalars.

  For the first `train_cfg.select_warmup_steps` steps every patch is taken (dense,
  on either path); one compiled program holds both branches.
  """
  dense_model = ScanFormer(cfg)
  warmup_steps = train_cfg.select_warmup_steps
  sparse = train_cfg.path == "sparse"
  if sparse:
    try:
      slots = train_cfg.sparse_slots(cfg, loss_cfg)
    except ValueError as e:
      raise UserError(f"train.path=sparse: {e}") from None

  def loss_fn(params, batch, rng, take_all):
    inputs = (batch["image"], batch["text_ids"], batch["text_mask"])
    b = batch["image"].shape[0]

    def gumbel_scan():
      if sparse:
        return dense_model.apply({"params": params}, *inputs, mode="sparse", train=True,
                                 rngs={"gumbel": rng}, slots=slots)
      return dense_model.apply({"params": params}, *inputs, mode="dense", train=True,
                               rngs={"gumbel": rng})

    def every_patch():
      every = tuple(jnp.ones((b, n), jnp.float32) for n in cfg.num_patches)
      return dense_model.apply({"params": params}, *inputs, mode="dense", train=True,
                               rngs={"gumbel": rng}, force_taken=every)

    out = jax.lax.cond(take_all, every_patch, gumbel_scan) if warmup_steps else gumbel_scan()
    total, terms = losses.scanformer_loss(out, batch["box"], batch["valid"], loss_cfg)
    if sparse:
      dropped = out.num_dropped.sum(axis=0)  # [S]
      terms.update({f"dropped_s{s}": dropped[s] for s in range(1, cfg.num_scales)})
    return total, terms

  def step(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(state.rng, state.step)
    take_all = state.step < warmup_steps
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
