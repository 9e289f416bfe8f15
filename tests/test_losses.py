"""Loss terms: per-scale L1/GIoU, keep-ratio, IoU head, padding rows weigh nothing."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scanformer_jax import losses
from scanformer_jax.config import LossConfig


def _out(boxes, taken, pred_iou=None):
  return types.SimpleNamespace(boxes=jnp.asarray(boxes, jnp.float32),
                               taken=tuple(jnp.asarray(t, jnp.float32) for t in taken),
                               exit_heads={} if pred_iou is None else {"iou": pred_iou})


def test_terms_by_hand():
  gt = np.array([[0.5, 0.5, 0.2, 0.2]], np.float32)
  boxes = np.array([[[0.5, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2]]], np.float32)  # exact, shifted
  taken = [np.ones((1, 4)), np.array([[1, 1, 0, 0, 0, 0, 0, 0]])]  # keep 1.0, 0.25
  cfg = LossConfig(l1_weight=5, giou_weight=2, target_ratio=(1.0, 0.5), ratio_weight=3)
  total, terms = losses.scanformer_loss(_out(boxes, taken), gt, np.ones(1, bool), cfg)
  # Scale 1: shifted by 0.1 -> L1 0.1; IoU = 0.1*0.2 / (0.08 - 0.02 ... ) by hand:
  inter, union = 0.1 * 0.2, 2 * 0.04 - 0.1 * 0.2
  iou = inter / union  # hull == union (same height, overlapping): GIoU = IoU
  assert float(terms["l1_s0"]) == pytest.approx(0, abs=1e-6)
  assert float(terms["l1_s1"]) == pytest.approx(0.1, abs=1e-5)
  assert float(terms["giou_s1"]) == pytest.approx(1 - iou, abs=1e-5)
  assert float(terms["ratio"]) == pytest.approx((0.25 - 0.5) ** 2, abs=1e-6)
  assert float(terms["keep_s1"]) == pytest.approx(0.25)
  want = 5 * 0.1 + 2 * (1 - iou) + 3 * 0.0625
  assert float(total) == pytest.approx(want, abs=1e-4)


def test_padding_rows_are_ignored():
  gt = np.array([[0.5, 0.5, 0.2, 0.2], [0, 0, 0, 0]], np.float32)
  boxes = np.array([[[0.5, 0.5, 0.2, 0.2]], [[0.9, 0.9, 0.1, 0.1]]], np.float32)
  cfg = LossConfig(target_ratio=(1.0,))
  total, terms = losses.scanformer_loss(_out(boxes, [np.ones((2, 4))]), gt,
                                        np.array([True, False]), cfg)
  assert float(total) == pytest.approx(0.0, abs=1e-5)


def test_iou_head_term_is_trained_against_stop_gradient_iou():
  gt = jnp.array([[0.5, 0.5, 0.2, 0.2]])
  cfg = LossConfig(target_ratio=(1.0,), exit_head_weights=(("iou", 1.0),))

  def loss(boxes, pred_iou):
    out = _out(boxes, [np.ones((1, 4))], pred_iou)
    return losses.scanformer_loss(out, gt, jnp.ones(1, bool), cfg)[1]["exit_iou"]

  boxes = jnp.array([[[0.55, 0.5, 0.2, 0.2]]])
  g_boxes, g_pred = jax.grad(loss, argnums=(0, 1))(boxes, jnp.array([[0.9]]))
  np.testing.assert_array_equal(np.asarray(g_boxes), 0.0)  # No gradient into the boxes.
  assert float(g_pred[0, 0]) > 0  # pred 0.9 > true IoU: push it down.


def test_config_length_mismatch_is_an_error():
  with pytest.raises(ValueError, match="target_ratio"):
    losses.scanformer_loss(_out(np.zeros((1, 2, 4)), [np.ones((1, 4))] * 2),
                           np.zeros((1, 4)), np.ones(1, bool), LossConfig(target_ratio=(1.0,)))
