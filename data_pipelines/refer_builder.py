"""TFDS builder for datasets in the original `refer` layout (no TensorFlow needed).

Input (https://github.com/lichengunc/refer):
  <refer_root>/<dataset>/refs(<split_by>).p   pickled refs (read with safe_pickle)
  <refer_root>/<dataset>/instances.json       COCO-style images + annotations
  <image_dir>/...                             the images, found by `file_name`
                                              (directly or anywhere below image_dir)
Datasets: refcoco (unc, google), refcoco+ (unc), refcocog (umd, google), refclef
(unc, berkeley) = ReferItGame, or anything else in that layout. Output: TFDS
`refer/<dataset>_<split_by>` ('+' spelled 'plus'), splits as in the refs (train, val,
testA, testB, test), one record per image in the flat layout (`flat_format`); the
image bytes are copied unchanged.

Images that are missing or whose header does not parse are skipped and counted.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import flat_format, safe_pickle
from data_pipelines.errors import DataError

log = logging.getLogger("data_pipelines")
VERSION = "1.0.0"
KNOWN = (("refcoco", "unc"), ("refcoco", "google"), ("refcoco+", "unc"),
         ("refcocog", "umd"), ("refcocog", "google"), ("refclef", "unc"),
         ("refclef", "berkeley"))


def config_name(dataset: str, split_by: str) -> str:
  return f"{dataset.replace('+', 'plus')}_{split_by}"


@dataclasses.dataclass(eq=False)
class ReferConfig(tfds.core.BuilderConfig):
  dataset: str = "refcoco"
  split_by: str = "unc"


def _new_config(dataset: str, split_by: str) -> ReferConfig:
  return ReferConfig(name=config_name(dataset, split_by), dataset=dataset,
                     split_by=split_by, description=f"{dataset} split by {split_by}")


_KNOWN_CONFIGS = {(d, s): _new_config(d, s) for d, s in KNOWN}


def make_config(dataset: str, split_by: str) -> ReferConfig:
  """The config for (dataset, split_by); any refer-layout dataset is allowed."""
  return _KNOWN_CONFIGS.get((dataset, split_by)) or _new_config(dataset, split_by)


_STEPS = (
    "Get the refer annotations as described at https://github.com/lichengunc/refer "
    "(data/<dataset>/refs(<split_by>).p and instances.json; refcoco, refcoco+, "
    "refcocog use the COCO train2014 images, refclef the ImageCLEF/SAIAPR TC-12 "
    "images) and pass --refer-root <that data dir> --image-dir <the image dir>.")


def check_inputs(refer_root: str | os.PathLike, dataset: str, split_by: str,
                 image_dir: str | os.PathLike) -> tuple[Path, Path]:
  """(refs pickle, instances.json) paths; DataError naming what is missing."""
  folder = Path(refer_root) / dataset
  refs_path = folder / f"refs({split_by}).p"
  inst_path = folder / "instances.json"
  for p in (refs_path, inst_path):
    if not p.is_file():
      raise DataError(f"missing {p}\n{_STEPS}")
  if not Path(image_dir).is_dir():
    raise DataError(f"image directory not found: {image_dir}\n{_STEPS}")
  return refs_path, inst_path


class Refer(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Referring expressions from refer-layout annotation files."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = list(_KNOWN_CONFIGS.values())

  def __init__(self, *, refer_root: str | os.PathLike | None = None,
               image_dir: str | os.PathLike | None = None,
               max_bad_fraction: float = 0.01, **kwargs: Any):
    self._refer_root = Path(refer_root) if refer_root else None
    self._image_dir = Path(image_dir) if image_dir else None
    self._max_bad_fraction = max_bad_fraction
    self._name_index: dict[str, Path] | None = None
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=flat_format.features(
            **{"image/filename": tfds.features.Tensor(shape=(), dtype=np.object_),
               "ref_ids": tfds.features.Tensor(shape=(None,), dtype=np.int64),
               "category_ids": tfds.features.Tensor(shape=(None,), dtype=np.int64)}))

  # ------------------------------------------------------------------ inputs
  def _inputs(self) -> tuple[list[dict], dict[int, dict], dict[int, dict]]:
    c = self.builder_config
    if self._refer_root is None or self._image_dir is None:
      raise DataError("building refer datasets needs refer_root and image_dir")
    refs_path, inst_path = check_inputs(self._refer_root, c.dataset, c.split_by,
                                        self._image_dir)
    refs = safe_pickle.load(refs_path)
    if not isinstance(refs, list):
      raise DataError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
    inst = json.loads(inst_path.read_text())
    images = {int(i["id"]): i for i in inst["images"]}
    anns = {int(a["id"]): a for a in inst["annotations"]}
    return refs, images, anns

  def _split_generators(self, dl_manager):
    del dl_manager
    refs, images, anns = self._inputs()
    by_split: dict[str, list[dict]] = collections.defaultdict(list)
    for r in refs:
      by_split[str(r["split"])].append(r)
    return {split: self._generate_examples(rs, images, anns, split)
            for split, rs in sorted(by_split.items())}

  def _find_image(self, file_name: str) -> Path | None:
    direct = self._image_dir / file_name
    if direct.is_file():
      return direct
    if self._name_index is None:
      self._name_index = {}
      for dirpath, _, files in os.walk(self._image_dir):
        for f in files:
          self._name_index.setdefault(f, Path(dirpath) / f)
    return self._name_index.get(os.path.basename(file_name))

  def _generate_examples(self, refs: list[dict], images: dict[int, dict],
                         anns: dict[int, dict], split: str):
    by_image: dict[int, list[dict]] = collections.defaultdict(list)
    for r in refs:
      by_image[int(r["image_id"])].append(r)
    bad: collections.Counter = collections.Counter()
    for image_id in sorted(by_image):
      info = images.get(image_id)
      if info is None:
        bad["image not in instances.json"] += 1
        continue
      path = self._find_image(str(info["file_name"]))
      if path is None:
        bad["image file missing"] += 1
        if bad["image file missing"] <= 3:
          log.warning("%s: image %s not found under %s", split, info["file_name"],
                      self._image_dir)
        continue
      data = path.read_bytes()
      try:
        Image.open(io.BytesIO(data)).size  # noqa: B018 -- header only
      except Exception:  # PIL raises many types for garbage input
        bad["image unreadable"] += 1
        continue
      exprs, boxes, ref_ids, expr_ids, ann_ids, cats = [], [], [], [], [], []
      for r in sorted(by_image[image_id], key=lambda r: int(r["ref_id"])):
        ann = anns.get(int(r["ann_id"]))
        if ann is None:
          bad["annotation missing"] += 1
          continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        for s in sorted(r["sentences"], key=lambda s: int(s["sent_id"])):
          exprs.append(str(s.get("raw", s.get("sent", ""))))
          boxes.append([x, y, x + w, y + h])
          ref_ids.append(int(r["ref_id"]))
          expr_ids.append(int(s["sent_id"]))
          ann_ids.append(int(r["ann_id"]))
          cats.append(int(r.get("category_id", ann.get("category_id", -1))))
      if not exprs:
        continue
      yield image_id, {
          "image": data, "image/id": image_id, "image/filename": str(info["file_name"]),
          "height": int(info["height"]), "width": int(info["width"]),
          "expressions": exprs, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
          "object_ids": ann_ids, "expr_ids": expr_ids, "ref_ids": ref_ids,
          "category_ids": cats,
      }
    total = len(by_image)
    nbad = sum(v for k, v in bad.items() if k != "annotation missing")
    if bad:
      log.warning("refer %s/%s: skipped %s", self.builder_config.name, split, dict(bad))
    if total and nbad / total > self._max_bad_fraction:
      raise DataError(
          f"refer {self.builder_config.name} split {split}: {nbad} of {total} images "
          f"skipped ({dict(bad)}); are the images under {self._image_dir}? {_STEPS}")


def build(refer_root: str | os.PathLike, dataset: str, split_by: str,
          image_dir: str | os.PathLike, data_dir: str | os.PathLike,
          max_bad_fraction: float = 0.01) -> Path:
  """Builds `refer/<dataset>_<split_by>` under data_dir; returns its dir."""
  check_inputs(refer_root, dataset, split_by, image_dir)  # before TFDS makes dirs
  from data_pipelines.tfds_compat import patch_importlib_resources
  patch_importlib_resources()
  builder = Refer(refer_root=refer_root, image_dir=image_dir,
                  max_bad_fraction=max_bad_fraction, config=make_config(dataset, split_by),
                  data_dir=os.fspath(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return Path(os.fspath(builder.data_path))
