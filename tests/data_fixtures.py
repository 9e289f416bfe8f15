"""Tiny on-disk fixtures for the data tests (no downloads, a few KB each).

`make_refer_fixture` writes the same referring expressions in two layouts:
  - the `refer` toolkit layout: `<root>/refer/refcoco/refs(unc).p`, `instances.json`
    and JPEGs in `<root>/images/`;
  - the TFDS catalog `ref_coco` manual-download layout (see its
    `manual_download_process.py`): `<root>/manual/refcoco.json` + `coco_train2014/`.
and returns the expected flattened samples.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

# (image_id, split, width, height, [(ann_id, category, (x, y, w, h), rgb)])
_IMAGES = [
    (11, "train", 96, 64, [(101, 1, (4.5, 6.0, 30.0, 40.25), (220, 30, 30)),
                           (102, 3, (50.0, 10.0, 40.0, 30.0), (30, 200, 30)),
                           (103, 3, (20.0, 50.0, 10.0, 8.0), (30, 30, 220))]),
    (12, "train", 64, 96, [(104, 1, (10.0, 20.0, 40.0, 60.0), (230, 200, 20))]),
    (13, "val", 80, 80, [(105, 1, (0.0, 0.0, 40.0, 40.0), (220, 30, 30)),
                         (106, 1, (40.0, 40.0, 40.0, 40.0), (30, 200, 30))]),
    (14, "val", 120, 60, [(107, 18, (60.25, 5.5, 50.5, 50.0), (30, 30, 220))]),
    (15, "testA", 64, 64, [(108, 1, (16.0, 16.0, 32.0, 32.0), (230, 200, 20))]),
    (16, "testB", 72, 48, [(109, 62, (2.0, 3.0, 20.0, 20.0), (220, 30, 30)),
                           (110, 62, (40.0, 20.0, 25.0, 25.0), (30, 200, 30))]),
]
# (ref_id, ann_id, [(sent_id, raw)])
_REFS = [
    (1, 101, [(1001, "red box on the left"), (1002, "Left red thing")]),
    (2, 102, [(1003, "green one right")]),
    (3, 104, [(1004, "yellow rectangle"), (1005, "the tall one"), (1006, "yellow")]),
    (4, 105, [(1007, "top left square")]),
    (5, 106, [(1008, "bottom right green square")]),
    (6, 107, [(1009, "blue blob to the right")]),
    (7, 108, [(1010, "person in the middle")]),
    (8, 110, [(1011, "green thing right"), (1012, "the right one")]),
]


def coco_name(image_id: int) -> str:
  return f"COCO_train2014_{image_id:012d}.jpg"


def make_refer_fixture(root: str | os.PathLike) -> list[dict]:
  """Writes both layouts under `root`; returns the expected samples in ref order."""
  root = Path(root)
  img_dir = root / "images"
  ref_dir = root / "refer" / "refcoco"
  coco_dir = root / "manual" / "coco_train2014"
  for d in (img_dir, ref_dir, coco_dir):
    d.mkdir(parents=True, exist_ok=True)
  images, anns, by_ann = [], [], {}
  for image_id, split, w, h, objs in _IMAGES:
    arr = np.full((h, w, 3), 128, np.uint8)
    for ann_id, cat, (x, y, bw, bh), rgb in objs:
      arr[int(y):int(y + bh), int(x):int(x + bw)] = rgb
      ann = {"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": 0,
             "bbox": [x, y, bw, bh], "area": bw * bh + 0.25,
             "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]}
      anns.append(ann)
      by_ann[ann_id] = (ann, image_id, split)
    Image.fromarray(arr).save(img_dir / coco_name(image_id), quality=95)
    shutil.copy(img_dir / coco_name(image_id), coco_dir / coco_name(image_id))
    images.append({"id": image_id, "file_name": coco_name(image_id), "height": h,
                   "width": w, "license": 1})
  refs, expected = [], []
  for ref_id, ann_id, sents in _REFS:
    ann, image_id, split = by_ann[ann_id]
    refs.append({
        "ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split,
        "category_id": ann["category_id"], "file_name": coco_name(image_id)[:-4] + f"_{ann_id}.jpg",
        "sent_ids": [s for s, _ in sents],
        "sentences": [{"sent_id": s, "raw": raw, "sent": raw.lower(),
                       "tokens": raw.lower().split()} for s, raw in sents],
    })
    x, y, bw, bh = ann["bbox"]
    size = next((h, w) for i, _, w, h, _ in _IMAGES if i == image_id)
    for sent_id, raw in sents:
      expected.append({"split": split, "expression": raw, "image_id": image_id,
                       "box": [x, y, x + bw, y + bh], "image_size": list(size),
                       "ref_id": ref_id, "expr_id": sent_id})
  with open(ref_dir / "refs(unc).p", "wb") as f:
    pickle.dump(refs, f, protocol=2)
  instances = {"images": images, "annotations": anns,
               "categories": [{"id": c, "name": f"cat{c}", "supercategory": "x"}
                              for c in (1, 3, 18, 62)]}
  (ref_dir / "instances.json").write_text(json.dumps(instances))
  # The catalog builder's input, exactly as manual_download_process.py writes it.
  all_refs = []
  for r in refs:
    r = dict(r, ann=by_ann[r["ann_id"]][0], dataset="refcoco", dataset_partition="unc")
    all_refs.append(r)
  coco_anns = {image_id: {"info": next(i for i in images if i["id"] == image_id),
                          "anns": [a for a in anns if a["image_id"] == image_id]}
               for image_id in {r["image_id"] for r in refs}}
  (root / "manual" / "refcoco.json").write_text(
      json.dumps({"ref": all_refs, "coco_anns": coco_anns}))
  return expected


_HIDE_TF = textwrap.dedent("""
    import importlib.machinery, sys
    class _HideTF:
      @classmethod
      def find_spec(cls, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
          return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)
      @classmethod
      def invalidate_caches(cls):
        importlib.machinery.PathFinder.invalidate_caches()
    sys.meta_path[:] = [_HideTF if f is importlib.machinery.PathFinder else f
                        for f in sys.meta_path]
""")


def run_python(code: str, *, hide_tensorflow: bool, timeout: float = 300,
               cwd: str | None = None) -> subprocess.CompletedProcess:
  """Runs `code` in a fresh interpreter; optionally TensorFlow looks uninstalled."""
  prog = (_HIDE_TF if hide_tensorflow else "") + textwrap.dedent(code)
  repo = str(Path(__file__).resolve().parents[1])
  env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                        timeout=timeout, cwd=cwd or repo, env=env)


def synthetic_data_dir(tmp_path_factory, config: str = "tiny") -> Path:
  """Builds synthetic/<config> once per test session (worker) and returns data_dir."""
  data_dir = tmp_path_factory.getbasetemp() / "data_synthetic"
  if not (data_dir / "synthetic" / config).is_dir():
    from data_pipelines import synthetic_builder
    synthetic_builder.build(data_dir, config)
  return data_dir


def encode(img: np.ndarray, fmt: str = "PNG") -> bytes:
  import io
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format=fmt)
  return buf.getvalue()


def block_sample(i: int, *, w: int = 48, h: int = 32, text: str | None = None,
                 box=None, image: bytes | None = None) -> dict:
  """An in-memory raw sample: a white block at `box` (pixels) on grey."""
  box = [4.0 + i % 10, 4.0, 20.0 + i % 10, 24.0] if box is None else box
  if image is None:
    arr = np.full((h, w, 3), 90, np.uint8)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    if x1 > x0 and y1 > y0:
      arr[max(y0, 0):y1, max(x0, 0):x1] = 250
    image = encode(arr)
  return {"image": image, "expression": f"the left block {i}" if text is None else text,
          "box": np.asarray(box, np.float64), "box_format": "xyxy", "image_id": i,
          "object_id": 0, "expr_id": i, "index": i}
