"""Box conversions, IoU and GIoU against hand-computed values."""

import numpy as np
import pytest

from scanformer_jax import box_ops


def test_round_trip():
  box = np.array([[0.5, 0.4, 0.2, 0.6], [0.1, 0.9, 0.05, 0.1]], np.float32)
  xyxy = box_ops.cxcywh_to_xyxy(box)
  np.testing.assert_allclose(xyxy[0], [0.4, 0.1, 0.6, 0.7], atol=1e-6)
  np.testing.assert_allclose(box_ops.xyxy_to_cxcywh(xyxy), box, atol=1e-6)


@pytest.mark.parametrize("a, b, iou, giou", [
    ([0, 0, 2, 2], [0, 0, 2, 2], 1.0, 1.0),
    ([0, 0, 2, 2], [1, 0, 3, 2], 2 / 6, 2 / 6),          # hull 3x2 = union
    ([0, 0, 1, 1], [2, 0, 3, 1], 0.0, 0 - (3 - 2) / 3),  # disjoint: hull 3, union 2
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7, 1 / 7 - (9 - 7) / 9),
])
def test_iou_giou_by_hand(a, b, iou, giou):
  a, b = np.array(a, np.float32), np.array(b, np.float32)
  assert float(box_ops.iou_xyxy(a, b)) == pytest.approx(iou, abs=1e-5)
  assert float(box_ops.giou_xyxy(a, b)) == pytest.approx(giou, abs=1e-5)


def test_broadcast_over_scales_and_degenerate_boxes():
  pred = np.array([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.0, 0.0]]], np.float32)  # [1, 2, 4]
  gt = np.array([[[0.5, 0.5, 0.2, 0.2]]], np.float32)  # [1, 1, 4]
  iou = np.asarray(box_ops.iou_cxcywh(pred, gt))
  giou = np.asarray(box_ops.giou_cxcywh(pred, gt))
  assert iou.shape == (1, 2) and np.all(np.isfinite(giou))
  np.testing.assert_allclose(iou[0], [1.0, 0.0], atol=1e-5)
