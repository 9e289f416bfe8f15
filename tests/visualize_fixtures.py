"""Sample images, letterbox metas and gallery records for the visualize tests."""

import numpy as np

from data_pipelines import transforms
from scanformer_jax.visualize import gallery


def letterbox_meta(height: int, width: int, frame: int) -> dict:
  """The meta row the eval / predict pipeline records for an unaugmented image."""
  g = transforms.letterbox_geometry(width, height, frame)
  return {"orig_size": np.array([height, width], np.int32), "frame_size": frame,
          "scale": np.array([g.sx, g.sy], np.float32),
          "offset": np.array([g.ox, g.oy], np.float32), "flip": False}


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
  """High-frequency content: every pixel differs from its neighbours."""
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_records(n: int, seed: int = 0) -> tuple[list, dict]:
  """`n` two-scale gallery records (random IoUs, markup in the text) and their images."""
  rng = np.random.default_rng(seed)
  records, images = [], {}
  for k in range(n):
    h, w = int(rng.integers(60, 200)), int(rng.integers(60, 200))
    meta = letterbox_meta(h, w, 64)
    iou = np.sort(rng.uniform(0, 1, 2))
    record = gallery.GalleryRecord(
        sample_id=f"val/{k}", expression=f'the <b>cup</b> & "saucer" #{k}', meta=meta,
        boxes=np.tile([[0.4, 0.4, 0.3, 0.3]], (2, 1)),
        taken=(np.ones(4, bool), rng.random(16) < 0.4),
        gt_box=np.array([5.0, 5.0, w / 2, h / 2]), iou=iou, pred_iou=iou * 0.9)
    records.append(record)
    images[record.sample_id] = noise(h, w, seed=k)
  return records, images
