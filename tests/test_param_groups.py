"""Parameter groups follow the tree: params["backbone"] is ViLT's, the rest is new."""

import jax
import jax.numpy as jnp

from scanformer_jax import ModelConfig, optim, train_state

# Every exit head on, so every head's parameters exist.
CFG = ModelConfig.tiny(exit_heads=("iou", "halt", "uncertainty"), num_layers=3)


def test_backbone_subtree_holds_vilt_and_the_rest_is_new():
  params = train_state.abstract_params(CFG)
  assert set(params["backbone"]) == {
      "text_embed", "patch_embed", "pos_embed", "modality_embed", "final_norm", "layers_0",
      "layers_1", "layers_2"}
  assert set(params) == {"backbone", "reg_tokens", "scale_embed", "const_tokens",
                         "select_head", "box_head", "exit_heads"}
  assert set(params["exit_heads"]) == {"iou", "halt", "uncertainty"}
  labels = optim.param_labels(params)
  assert set(jax.tree.leaves(labels["backbone"])) == {"backbone"}
  for name in set(params) - {"backbone"}:
    assert set(jax.tree.leaves(labels[name])) == {"new"}, name


def test_a_new_head_trains_at_the_full_rate_without_a_table():
  """A parameter no list names (a fork's head) is "new": no table to edit."""
  labels = optim.param_labels({"backbone": {"w": jnp.zeros(2)}, "fork_head": {"w": jnp.zeros(2)}})
  assert labels == {"backbone": {"w": "backbone"}, "fork_head": {"w": "new"}}


def test_optimizer_trains_groups_at_their_learning_rates():
  """An update moves a "new" parameter at `learning_rate`, a backbone one at its own rate."""
  cfg = optim.OptimConfig(learning_rate=1e-2, backbone_learning_rate=1e-4, warmup_steps=0,
                          weight_decay=0.0, grad_clip_norm=0.0)
  tx, _ = optim.make_optimizer(cfg, num_steps=10)
  tree = {"reg_tokens": jnp.zeros((2, 2)), "backbone": {"layers_0": {"w": jnp.zeros((2, 2))}}}
  grads = jax.tree.map(jnp.ones_like, tree)
  updates, _ = tx.update(grads, tx.init(tree), tree)
  # Adam's first step is lr * sign(g) (up to eps).
  assert jnp.allclose(updates["reg_tokens"], -1e-2, rtol=1e-3)
  assert jnp.allclose(updates["backbone"]["layers_0"]["w"], -1e-4, rtol=1e-3)
