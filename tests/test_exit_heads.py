"""Exit heads (IoU, halting, box uncertainty): they learn without changing the
grounding model, their losses are what they claim, and a fork's new criterion is
one registered class that runs on the host and under jit."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fake_data
from scanformer_jax import early_exit, exit_heads, losses, train_state
from scanformer_jax.config import LossConfig, ModelConfig
from scanformer_jax.model import ScanFormer

BASE = ModelConfig.tiny(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2,
                        encoder1_layers=1)
HEADS = dict(exit_heads=("iou", "halt", "uncertainty"))


def _batch(n: int = 4) -> dict:
  rows = [fake_data.make_example(2, i, BASE.image_size, BASE.max_text_len) for i in range(n)]
  return {k: jnp.asarray(np.stack([r[k] for r in rows]))
          for k in ("image", "text_ids", "text_mask", "box", "valid")}


def _loss_and_grads(cfg: ModelConfig, params, batch):
  """(loss, terms), gradients of the dense training loss (fixed Gumbel noise)."""
  def loss_fn(p):
    out = ScanFormer(cfg).apply({"params": p}, batch["image"], batch["text_ids"],
                                batch["text_mask"], mode="dense", train=True,
                                rngs={"gumbel": jax.random.PRNGKey(7)})
    total, terms = losses.scanformer_loss(out, batch["box"], batch["valid"], LossConfig())
    return total, terms
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)


@pytest.fixture(scope="module")
def grads():
  batch = _batch()
  plain = train_state.init_params(BASE, jax.random.PRNGKey(0))
  with_heads = train_state.init_params(BASE.replace(**HEADS), jax.random.PRNGKey(0))
  return batch, plain, with_heads, _loss_and_grads(BASE, plain, batch)


def test_exit_heads_do_not_change_the_grounding_model(grads):
  """Same init for every shared parameter, and the same gradient for each of them:
  the heads read stop_gradient(REG) and their losses reach only their own weights."""
  batch, plain, with_heads, ((_, terms0), g0) = grads
  assert set(with_heads) - set(plain) == {"exit_heads"}
  assert set(with_heads["exit_heads"]) == {"iou", "halt", "uncertainty"}
  for name in plain:
    jax.tree.map(np.testing.assert_array_equal, plain[name], with_heads[name])
  (_, terms1), g1 = _loss_and_grads(BASE.replace(**HEADS), with_heads, batch)
  assert {"exit_iou", "exit_halt", "exit_uncertainty"} <= set(terms1)
  for key in ("l1", "giou", "ratio"):
    np.testing.assert_allclose(terms1[key], terms0[key], rtol=1e-6)
  for name in plain:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 g0[name], g1[name])
  for head in ("iou", "halt", "uncertainty"):
    assert any(np.abs(x).max() > 0 for x in jax.tree.leaves(g1["exit_heads"][head])), head


def test_without_the_stop_gradient_the_heads_train_the_backbone(grads):
  """The switch matters: heads reading REG directly change the backbone's gradients."""
  batch, _, with_heads, (_, g0) = grads
  _, g1 = _loss_and_grads(BASE.replace(exit_heads_stop_gradient=False, **HEADS), with_heads,
                          batch)
  diff = max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(g0["backbone"]["layers_0"]), jax.tree.leaves(g1["backbone"]["layers_0"])))
  assert diff > 1e-6


def test_halt_loss_targets_correct_boxes():
  iou = jnp.array([[0.2, 0.6], [0.5, 0.49]])
  valid = jnp.array([True, True])
  right = jnp.where(iou >= 0.5, 20.0, -20.0)  # Confident and right: ~0 loss.
  halt_loss = lambda logit, iou, valid: exit_heads.halt_bce_loss(  # noqa: E731
      logit, exit_heads.HeadTargets(boxes=jnp.zeros(iou.shape + (4,)), iou=iou,
                                    gt_box=jnp.zeros((iou.shape[0], 4)), valid=valid))
  assert float(halt_loss(right, iou, valid)) < 1e-6
  assert float(halt_loss(-right, iou, valid)) > 30  # Confident and wrong.
  # Padding rows weigh nothing.
  assert float(halt_loss(right.at[1].set(-right[1]), iou, jnp.array([True, False]))) < 1e-6


def test_laplace_nll_is_smallest_at_the_true_error():
  """d NLL / d log b = 1 - |err| / b: zero where the predicted scale b = |err|."""
  boxes = jnp.array([[[0.5, 0.5, 0.2, 0.2]]])
  gt = jnp.array([[0.55, 0.4, 0.25, 0.3]])  # Every coordinate off.
  err = jnp.abs(boxes[0, 0] - gt[0])  # [4]
  valid = jnp.array([True])
  def laplace_nll(boxes, log_b, gt, valid):
    return exit_heads.laplace_nll_loss(log_b, exit_heads.HeadTargets(
        boxes=boxes, iou=jnp.zeros(boxes.shape[:2]), gt_box=gt, valid=valid))
  nll = lambda log_b: laplace_nll(boxes, log_b, gt, valid)  # noqa: E731
  at_err = jnp.log(err)[None, None]
  grad = jax.grad(nll)(at_err)
  np.testing.assert_allclose(grad, 0.0, atol=1e-5)
  assert float(nll(at_err + 0.5)) > float(nll(at_err))
  assert float(nll(at_err - 0.5)) > float(nll(at_err))
  # No gradient reaches the boxes.
  g_boxes = jax.grad(lambda b: laplace_nll(b, at_err, gt, valid))(boxes)
  assert float(jnp.abs(g_boxes).max()) == 0.0


def test_a_new_criterion_is_one_class_on_the_host_and_under_jit(monkeypatch):
  """The README's example: one registered class; the host sweep and the jitted exit
  path call the same `stop` (the threshold may be a traced scalar)."""
  # Registered into a copy: the other tests of this process see the registry as shipped.
  monkeypatch.setattr(early_exit, "_REGISTRY", dict(early_exit._REGISTRY))

  @early_exit.register("test_small_move")
  @dataclasses.dataclass(frozen=True)
  class SmallMove(early_exit.ExitCriterion):
    """Stop once the box centre moved less than `threshold` since the last scale."""
    grid = (0.01, 0.05)

    def stop(self, signals):
      if signals.scale == 0:
        return jnp.zeros(signals.boxes.shape[0], bool)
      moved = jnp.abs(signals.boxes[:, -1, :2] - signals.boxes[:, -2, :2]).max(-1)
      return moved < self.threshold

  criterion = early_exit.parse("test_small_move:0.05")
  assert criterion == SmallMove(0.05) and criterion.spec == "test_small_move:0.05"
  assert "test_small_move:0.01" in early_exit.sweep_specs()
  boxes = np.zeros((3, 3, 4), np.float32)
  boxes[1, 1:, 0] = 0.5      # Sample 1 moves at scale 1, then stays: exits at 2 (last).
  boxes[2, 1, 0] = 0.5
  boxes[2, 2, 0] = 0.52      # Sample 2 moves at 1, then barely: exits at 2.
  np.testing.assert_array_equal(criterion.exit_scale({"boxes": boxes}), [1, 2, 2])
  signals = early_exit.signals_at({"boxes": boxes}, 1)

  @jax.jit
  def jitted(threshold):
    return criterion.with_threshold(threshold).stop(signals)
  np.testing.assert_array_equal(jitted(0.05), [True, False, False])
  np.testing.assert_array_equal(jitted(1.0), [True, True, True])
