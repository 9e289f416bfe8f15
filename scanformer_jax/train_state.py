"""The training state pytree and how to create it (sharded, optionally from ViLT).

Everything a resumed run needs besides the data iterator: step, parameters, optimizer
state, the base RNG key (step keys are `fold_in(rng, step)`, so nothing else about
randomness has to be saved) and the count of skipped (non-finite) updates.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from scanformer_jax import sharding as sharding_lib
from scanformer_jax.config import MeshConfig, ModelConfig
from scanformer_jax.model import ScanFormer


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32: updates attempted so far (= batches consumed).
  params: Any
  opt_state: Any
  rng: jax.Array  # [2] uint32 raw PRNG key.
  skipped: jax.Array  # [] int32: updates dropped because loss/grads were not finite.


def dummy_inputs(cfg: ModelConfig, batch: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Zero image/text of the model's static shapes (for init and shape inference)."""
  image = jnp.zeros((batch, cfg.image_size, cfg.image_size, 3), jnp.float32)
  text_ids = jnp.zeros((batch, cfg.max_text_len), jnp.int32)
  text_mask = jnp.ones((batch, cfg.max_text_len), bool)
  return image, text_ids, text_mask


def init_params(cfg: ModelConfig, rng: jax.Array) -> Any:
  """Fresh parameters (the `params` collection) of `ScanFormer(cfg)`."""
  variables = ScanFormer(cfg).init({"params": rng}, *dummy_inputs(cfg), mode="dense")
  return variables["params"]


def abstract_params(cfg: ModelConfig) -> Any:
  return jax.eval_shape(functools.partial(init_params, cfg), jax.random.PRNGKey(0))


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation) -> TrainState:
  """Shapes/dtypes of the whole state, computed without allocating it."""
  def build(rng):
    params = init_params(cfg, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=rng, skipped=jnp.zeros((), jnp.int32))
  return jax.eval_shape(build, jax.random.PRNGKey(0))


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    mesh_cfg: MeshConfig) -> TrainState:
  return sharding_lib.tree_shardings(abstract_state(cfg, tx), mesh, mesh_cfg)


def put_global(tree: Any, shardings: Any) -> Any:
  """Host numpy tree (identical on every process) -> global arrays with `shardings`."""
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree.map(put, tree, shardings)


def create_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int,
                       mesh: Mesh, mesh_cfg: MeshConfig,
                       load_params: Optional[Callable[[Any], Any]] = None) -> TrainState:
  """A fresh, sharded state. `load_params(host_params) -> host_params` can replace
  initial weights (ViLT import); the optimizer is initialised after it."""
  shardings = state_shardings(cfg, tx, mesh, mesh_cfg)
  param_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
  params = jax.jit(init_params, static_argnums=0,
                   out_shardings=shardings.params)(cfg, param_rng)
  if load_params is not None:
    params = put_global(load_params(sharding_lib.fetch(params)), shardings.params)

  def build(params, rng):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=rng, skipped=jnp.zeros((), jnp.int32))

  return jax.jit(build, out_shardings=shardings)(params, state_rng)
