"""Trees saved before params["backbone"] move to today's layout; a restore says how."""

import jax
import numpy as np
import pytest

from scanformer_jax import ModelConfig, param_layout, train_state
from scanformer_jax.errors import UserError


def test_upgrade_moves_an_old_tree_to_todays_layout():
  cfg = ModelConfig.tiny(num_layers=2, exit_heads=("iou", "halt"))
  today = train_state.abstract_params(cfg)
  old = {**{k: v for k, v in today.items() if k not in ("backbone", "exit_heads")},
         **today["backbone"], "iou_head": today["exit_heads"]["iou"],
         "halt_head": today["exit_heads"]["halt"]}
  assert param_layout.is_old(old) and not param_layout.is_old(today)
  upgraded = param_layout.upgrade(old)
  assert jax.tree.structure(upgraded) == jax.tree.structure(today)
  assert param_layout.upgrade(today) == today
  with pytest.raises(UserError, match=r"param_layout.upgrade"):
    param_layout.check(old, "checkpoint 40")
  param_layout.check(today, "checkpoint 40")  # Today's layout passes.
  assert np.shape(upgraded["backbone"]["pos_embed"]) == np.shape(today["backbone"]["pos_embed"])


def test_restoring_an_old_layout_checkpoint_names_the_fix(tmp_path):
  """A checkpoint saved with ViLT's parameters at the top level: one line, the way out."""
  import grain  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from scanformer_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from scanformer_jax.config import CheckpointConfig  # pylint: disable=g-import-not-at-top

  def state(params):
    return train_state.TrainState(step=jnp.int32(1), params=params, opt_state={"m": jnp.zeros(1)},
                                  rng=jax.random.PRNGKey(0), skipped=jnp.int32(0))
  old = {"layers_0": {"w": jnp.ones((2, 2))}, "reg_tokens": jnp.ones((2,))}
  ckpt = checkpointing.Checkpointer(str(tmp_path), CheckpointConfig(async_save=False))
  ckpt.save(state(old), iter(grain.MapDataset.range(4).to_iter_dataset()))
  ckpt.close()
  today = param_layout.upgrade(old)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), today)
  shardings = jax.tree.map(lambda x: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                           today)
  reader = checkpointing.Checkpointer(str(tmp_path), CheckpointConfig(), read_only=True)
  with pytest.raises(UserError, match=r"step 1 .* layout before params\['backbone'\].*upgrade"):
    reader.restore_params(abstract, shardings)
  reader.close()
