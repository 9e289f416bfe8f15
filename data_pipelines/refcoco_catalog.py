"""The TFDS catalog `ref_coco` dataset: flattening its records, and building it.

Its records are per image: `objects` (the referred objects, with normalized
`bbox` = (ymin, xmin, ymax, xmax)) each holding a list of `refexp` sentences. We
flatten to one sample per sentence; the box becomes pixels once the image size is
known (the pipeline reads it from the image header).

Reading needs no TensorFlow. *Building* does (the catalog builder serializes its
nested sequences through TF, and computes masks with pycocotools); `build` says
exactly what to install when they are missing.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.errors import DataError

CONFIGS = ("refcoco_unc", "refcoco_google", "refcocoplus_unc", "refcocog_umd",
           "refcocog_google")
VERSION = "1.1.0"


def decoders():
  """Skip decoding the image and the masks (we decode the image ourselves)."""
  import tensorflow_datasets as tfds

  class _Raw(tfds.decode.SkipDecoding):
    """SkipDecoding that also works inside a Sequence on the numpy backend."""

    def decode_batch_example_np(self, x):
      return x

    def decode_ragged_example_np(self, x):
      return x

  return {"image": _Raw(), "objects": {"mask": _Raw()}}


def num_expressions(record: dict[str, Any]) -> list[int]:
  return [len(ids) for ids in record["objects"]["refexp"]["refexp_id"]]


def sample(record: dict[str, Any], obj: int, expr: int) -> dict[str, Any]:
  objects = record["objects"]
  raw = objects["refexp"]["raw"][obj][expr]
  return {
      "image": record["image"],
      "expression": raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw),
      "box": np.asarray(objects["bbox"][obj], np.float64),  # normalized y/x min/max
      "box_format": "yxyx_norm",
      "image_id": int(record["image/id"]),
      "object_id": int(objects["id"][obj]),  # COCO annotation id
      "expr_id": int(objects["refexp"]["refexp_id"][obj][expr]),
  }


INSTALL_HINT = (
    "building the catalog `ref_coco` dataset needs TensorFlow and pycocotools "
    "(reading it later does not). Install them with\n"
    "  pip install -e '.[refcoco-build]'\n"
    "(or: pip install tensorflow-cpu pycocotools), or build the same benchmarks "
    "without TensorFlow from the original refer files with `scanformer data refer`.")


def check_manual_dir(manual_dir: str | os.PathLike) -> Path:
  m = Path(manual_dir)
  steps = (
      "Prepare it as the TFDS `ref_coco` builder expects:\n"
      "  1. get the refer annotations (https://github.com/lichengunc/refer: refcoco, "
      "refcoco+, refcocog) and COCO instances_train2014.json;\n"
      "  2. run TFDS' `datasets/ref_coco/manual_download_process.py` (edit its three "
      "paths) to write refcoco.json;\n"
      f"  3. put refcoco.json and the COCO train2014 images as {m}/refcoco.json and "
      f"{m}/coco_train2014/COCO_train2014_*.jpg.")
  if not m.is_dir():
    raise DataError(f"manual download directory not found: {m}\n{steps}")
  for need in ("refcoco.json", "coco_train2014"):
    if not (m / need).exists():
      raise DataError(f"missing {m / need}\n{steps}")
  return m


def build(manual_dir: str | os.PathLike, data_dir: str | os.PathLike,
          configs: tuple[str, ...] = CONFIGS) -> list[Path]:
  """Builds catalog `ref_coco/<config>` for each config; returns the dataset dirs."""
  unknown = [c for c in configs if c not in CONFIGS]
  if unknown:
    raise DataError(f"unknown ref_coco configs {unknown}; choose from {list(CONFIGS)}")
  manual = check_manual_dir(manual_dir)
  missing = [m for m in ("tensorflow", "pycocotools") if importlib.util.find_spec(m) is None]
  if missing:
    raise DataError(f"missing {', '.join(missing)}: {INSTALL_HINT}")
  from data_pipelines.tfds_compat import patch_importlib_resources
  patch_importlib_resources()
  import tensorflow_datasets as tfds
  out = []
  for config in configs:
    builder = tfds.builder(f"ref_coco/{config}", data_dir=os.fspath(data_dir),
                           file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual)))
    out.append(Path(os.fspath(builder.data_path)))
  return out
