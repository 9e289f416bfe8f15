"""model.PARAM_GROUPS: every parameter is in exactly one group, and an undeclared one fails."""

import jax
import jax.numpy as jnp
import pytest

from scanformer_jax import ModelConfig, model, optim, train_state

# Every optional head on, so every declared name exists.
CFG = ModelConfig.tiny(iou_head=True, halt_head=True, uncertainty_head=True, num_layers=3)


@pytest.fixture(scope="module")
def params():
  return train_state.abstract_params(CFG)


def test_every_parameter_is_in_exactly_one_group(params):
  groups = {name: model.param_group(name) for name in params}
  assert {n for n, g in groups.items() if g == "new"} == set(model.PARAM_GROUPS["new"])
  assert {n for n, g in groups.items() if g == "backbone"} == {
      "text_embed", "patch_embed", "pos_embed", "modality_embed", "final_norm", "layers_0",
      "layers_1", "layers_2"}
  labels = optim.param_labels(params)
  for name, subtree in params.items():
    assert set(jax.tree.leaves(labels[name])) == {groups[name]}, name


def test_every_declared_entry_names_a_parameter(params):
  for group, entries in model.PARAM_GROUPS.items():
    for entry in entries:
      assert any(model._declares(entry, name) for name in params), (group, entry)


def test_a_parameter_in_no_group_fails(params):
  extra = {**params, "extra_head": {"kernel": jnp.zeros((4, 4))}}
  with pytest.raises(ValueError, match="'extra_head' is in 0 groups"):
    optim.param_labels(extra)
  for name in ("layers_x", "layers_", "box_head_2", "reg_tokens2"):
    with pytest.raises(ValueError, match="declared in exactly one"):
      model.param_group(name)


def test_a_parameter_in_two_groups_fails(monkeypatch):
  monkeypatch.setitem(model.PARAM_GROUPS, "new", model.PARAM_GROUPS["new"] + ("final_norm",))
  with pytest.raises(ValueError, match="in 2 groups"):
    model.param_group("final_norm")


def test_optimizer_trains_groups_at_their_learning_rates(params):
  """An update moves a "new" parameter at `learning_rate`, a backbone one at its own rate."""
  cfg = optim.OptimConfig(learning_rate=1e-2, backbone_learning_rate=1e-4, warmup_steps=0,
                    weight_decay=0.0, grad_clip_norm=0.0)
  tx, _ = optim.make_optimizer(cfg, num_steps=10)
  tree = {"reg_tokens": jnp.zeros((2, 2)), "layers_0": {"w": jnp.zeros((2, 2))}}
  grads = jax.tree.map(jnp.ones_like, tree)
  updates, _ = tx.update(grads, tx.init(tree), tree)
  # Adam's first step is lr * sign(g) (up to eps).
  assert jnp.allclose(updates["reg_tokens"], -1e-2, rtol=1e-3)
  assert jnp.allclose(updates["layers_0"]["w"], -1e-4, rtol=1e-3)
