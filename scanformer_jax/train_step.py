"""One optimizer step: hard Gumbel selection, loss, guarded update.

`train.path` picks the forward: "dense" (every patch a token) or "sparse" (the
taken patches in `train.sparse_slots` slots; the same loss and gradients, model.py
says why). The sparse step reports `dropped_s<k>`: patches of scale k in the batch
that Gumbel took but the capacity could not hold (replaced instead).

A step whose loss or gradients are not finite leaves parameters and optimizer state
untouched (`jnp.where` inside the jitted step, no host sync) and bumps
`state.skipped`.

Gumbel noise: row r of the global batch at step t draws from
`fold_in(fold_in(state.rng, t), r)` (the model runs per row under `vmap`), so a
resumed run draws exactly the noise the uninterrupted one would have, and the noise
of a sample does not depend on how the batch is split into microbatches or devices.

Gradient accumulation (`train.microbatches = N`): each device's rows are split into
N microbatches and a `lax.scan` sums their gradients in float32. Every loss term is a
mean over valid rows, so microbatch m is weighted by its share of the valid rows: the
loss, gradients and update equal the N = 1 step's (up to float summation order) for
1/N of the activation memory.

Warm-up (`train.select_warmup_steps`): the all-patches steps are a second compiled
program, chosen on the host (`SwitchedStep`); a `lax.cond` under `grad` would keep
the residuals of both branches in the one program for the whole run.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from scanformer_jax import losses, pixels, sharding as sharding_lib
from scanformer_jax.config import LossConfig, ModelConfig, TrainConfig
from scanformer_jax.errors import UserError
from scanformer_jax.model import ScanFormer
from scanformer_jax.train_state import TrainState

Batch = dict[str, jax.Array]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
# Metrics that count (summed over microbatches); every other term is a valid-row mean.
_COUNT_PREFIXES = ("dropped_s",)


class StepPrograms(NamedTuple):
  """The un-jitted step functions: `main`, and `warmup` for the first `warmup_steps`.

  `loss(params, batch, keys) -> (total, terms)`: the main step's loss of one
  (micro)batch with per-row Gumbel keys [B, 2] (`row_keys`), e.g. to inspect the
  residuals its backward pass saves (`jax.ad_checkpoint.saved_residuals`).
  """
  main: StepFn
  warmup: Optional[StepFn]
  warmup_steps: int
  loss: Optional[Callable] = None


def check_microbatches(batch_size: int, microbatches: int, batch_shards: int) -> None:
  """One line unless each of `batch_shards` devices splits its rows into `microbatches`."""
  if microbatches < 1 or batch_size % (microbatches * batch_shards):
    raise UserError(f"train.batch_size {batch_size} must be divisible by "
                    f"train.microbatches x devices = {microbatches} x {batch_shards}")


def split_microbatches(tree: Any, microbatches: int, batch_shards: int) -> Any:
  """[B, ...] leaves -> [N, B/N, ...], each device's rows split in place (no transfer).

  Row d * (B/D) + m * b + i (device d, b = B/(D N)) goes to microbatch m.
  """
  def split(x):
    b = x.shape[0] // (batch_shards * microbatches)
    x = x.reshape((batch_shards, microbatches, b) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((microbatches, batch_shards * b) + x.shape[3:])
  return jax.tree.map(split, tree)


def row_keys(rng: jax.Array, batch_size: int) -> jax.Array:
  """One Gumbel key per global row: `fold_in(rng, row)`; [B, 2] uint32."""
  return jax.vmap(lambda row: jax.random.fold_in(rng, row))(jnp.arange(batch_size))


def make_train_step(cfg: ModelConfig, loss_cfg: LossConfig, tx: optax.GradientTransformation,
                    schedules: dict[str, optax.Schedule],
                    train_cfg: TrainConfig = TrainConfig(),
                    batch_shards: int = 1) -> StepPrograms:
  """The un-jitted steps `(state, batch) -> (state, metrics)`; metrics are scalars.

  `main` samples hard Gumbel selections (dense or sparse path); with
  `train_cfg.select_warmup_steps > 0`, `warmup` takes every patch (dense, on either
  path). `batch_shards`: devices the batch is split over (microbatches split each
  device's rows).
  """
  sparse = train_cfg.path == "sparse"
  microbatches = getattr(train_cfg, "microbatches", 1)
  check_microbatches(train_cfg.batch_size, microbatches, batch_shards)
  model = ScanFormer(cfg)
  if sparse:
    try:
      slots = train_cfg.sparse_slots(cfg, loss_cfg)
    except ValueError as e:
      raise UserError(f"train.path=sparse: {e}") from None

  def forward(params, batch, keys, take_all: bool):
    """The model per row (its own Gumbel key), outputs stacked back to [B, ...]."""
    def one(image, text_ids, text_mask, key):
      inputs = (image[None], text_ids[None], text_mask[None])
      if take_all:
        every = tuple(jnp.ones((1, n), jnp.float32) for n in cfg.num_patches)
        return model.apply({"params": params}, *inputs, mode="dense", train=True,
                                 rngs={"gumbel": key}, force_taken=every)
      if sparse:
        return model.apply({"params": params}, *inputs, mode="sparse", train=True,
                           rngs={"gumbel": key}, slots=slots)
      return model.apply({"params": params}, *inputs, mode="dense", train=True,
                         rngs={"gumbel": key})
    out = jax.vmap(one)(batch["image"], batch["text_ids"], batch["text_mask"], keys)
    return jax.tree.map(lambda x: x[:, 0], out)  # [B, 1, ...] -> [B, ...]

  def loss_fn(params, batch, keys, take_all: bool):
    out = forward(params, batch, keys, take_all)
    total, terms = losses.scanformer_loss(out, batch["box"], batch["valid"], loss_cfg)
    if sparse:
      dropped = out.num_dropped.sum(axis=0)  # [S]
      terms.update({f"dropped_s{s}": dropped[s] for s in range(1, cfg.num_scales)})
    return total, terms

  def accumulated(params, batch, keys, take_all: bool):
    """Loss, terms and gradients of the whole batch from `microbatches` pieces."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
      return grad_fn(params, batch, keys, take_all)
    check_microbatches(batch["valid"].shape[0], microbatches, batch_shards)
    valid = batch["valid"].astype(jnp.float32)  # [B]
    total_valid = jnp.maximum(valid.sum(), 1.0)
    pieces = split_microbatches((batch, keys), microbatches, batch_shards)

    def body(grad_sum, piece):
      micro, micro_keys = piece
      share = micro["valid"].astype(jnp.float32).sum() / total_valid
      (loss, terms), grads = grad_fn(params, micro, micro_keys, take_all)
      grad_sum = jax.tree.map(lambda acc, g: acc + share * g.astype(jnp.float32),
                              grad_sum, grads)
      terms = {k: v if k.startswith(_COUNT_PREFIXES) else share * v
               for k, v in terms.items()}
      return grad_sum, (share * loss, terms)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    grad_sum, (loss, terms) = jax.lax.scan(body, zeros, pieces)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grad_sum, params)
    return (loss.sum(), jax.tree.map(lambda v: v.sum(axis=0), terms)), grads

  def build(take_all: bool) -> StepFn:
    def step(state: TrainState, batch: Batch):
      batch = pixels.normalized(batch)
      rng = jax.random.fold_in(state.rng, state.step)
      keys = row_keys(rng, batch["image"].shape[0])  # [B, 2]
      (loss, terms), grads = accumulated(state.params, batch, keys, take_all)
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

  warmup_steps = train_cfg.select_warmup_steps
  return StepPrograms(main=build(False), warmup=build(True) if warmup_steps else None,
                      warmup_steps=warmup_steps,
                      loss=lambda params, batch, keys: loss_fn(params, batch, keys, False))


class SwitchedStep:
  """The jitted programs; each call runs the warm-up one while `step < warmup_steps`.

  `step` is the state's step (updates done before this one); the trainer passes it
  from its own counter. Without it the state's step is read from the device (a sync),
  and only when there is a warm-up program to choose.
  """

  def __init__(self, main, warmup, warmup_steps: int):
    self.main, self.warmup, self.warmup_steps = main, warmup, warmup_steps

  def program(self, step: int):
    return self.warmup if self.warmup is not None and step < self.warmup_steps else self.main

  def __call__(self, state: TrainState, batch: Batch, step: Optional[int] = None):
    if self.warmup is None:
      return self.main(state, batch)
    if step is None:
      step = int(jax.device_get(state.step))
    return self.program(step)(state, batch)

  def lower(self, state: TrainState, batch: Batch, step: Optional[int] = None):
    """The main program lowered (the warm-up one for a `step` inside the warm-up)."""
    return self.program(self.warmup_steps if step is None else step).lower(state, batch)

  def _cache_size(self) -> int:
    """Compiled programs so far, over both (jax's jit cache sizes)."""
    programs = [self.main] + ([self.warmup] if self.warmup is not None else [])
    return sum(p._cache_size() for p in programs)  # pylint: disable=protected-access


def multi_step(step: StepFn) -> StepFn:
  """`step` over K stacked batches [K, B, ...] in one `lax.scan`: the same K updates,
  metrics stacked [K]."""
  def run(state: TrainState, batches: Batch):
    return jax.lax.scan(step, state, batches)
  return run


def jit_train_step(step: StepPrograms | StepFn, state_shardings: Any,
                   mesh: Mesh, steps_per_call: int = 1) -> SwitchedStep:
  """Jitted with the state donated, batch split on the batch axes, metrics replicated.

  steps_per_call > 1: each call takes that many stacked batches (`multi_step`)."""
  batch_sharding = (sharding_lib.stacked_batch_sharding(mesh) if steps_per_call > 1
                    else sharding_lib.batch_sharding(mesh))
  def jit(fn):
    if steps_per_call > 1:
      fn = multi_step(fn)
    return jax.jit(fn,
                   in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
                   donate_argnums=0)
  if not isinstance(step, StepPrograms):
    step = StepPrograms(main=step, warmup=None, warmup_steps=0)
  return SwitchedStep(jit(step.main), jit(step.warmup) if step.warmup else None,
                      step.warmup_steps)
