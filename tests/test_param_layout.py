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
