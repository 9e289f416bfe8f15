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

Images that are missing, larger than `images.MAX_IMAGE_BYTES` or whose header does
not parse are skipped and counted; so are refs whose box is NaN, infinite, negative,
of zero area or outside its image (`bad_input.check_box`, on the image's real size).
More than `max_bad_fraction` of a split's images, or of its boxes, refuses the build.
A ref without the toolkit's fields (`ref_id`, `ann_id`, `image_id`, `split`, and
`sentences` with integer `sent_id`s) refuses it, naming the ref. A `file_name` that
is absolute or climbs out of the image dir with `..` is refused.

Each build stores a hash of its inputs (the refs pickle, instances.json and the image
list: names, sizes, modification times) in `inputs.sha256`. Building again with the
same inputs reuses the build; with changed inputs (or a build without that file) it
is refused unless `overwrite=True` (`--overwrite`), which rebuilds from scratch.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import bad_input, flat_format, images as images_lib, safe_paths, safe_pickle
from data_pipelines.bad_input import BadSample
from data_pipelines.errors import DataError

log = logging.getLogger("data_pipelines")
VERSION = "1.0.0"
INPUTS_FILE = "inputs.sha256"
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
  safe_paths.check_name(dataset, "--dataset")
  safe_paths.check_name(split_by, "--split-by")
  folder = Path(refer_root) / dataset
  refs_path = folder / f"refs({split_by}).p"
  inst_path = folder / "instances.json"
  for p in (refs_path, inst_path):
    if not p.is_file():
      raise DataError(f"missing {p}. {_STEPS}")
  if not Path(image_dir).is_dir():
    raise DataError(f"image directory not found: {image_dir}. {_STEPS}")
  return refs_path, inst_path


@dataclasses.dataclass(frozen=True)
class Inputs:
  refs: list[dict]
  images: dict[int, dict]  # image id -> instances.json image entry
  anns: dict[int, dict]  # annotation id -> instances.json annotation


def read_inputs(refs_path: Path, inst_path: Path, image_dir: str | os.PathLike) -> Inputs:
  """Loads and checks the annotations; DataError naming the file if they are bad."""
  try:
    refs = safe_pickle.load(refs_path)
  except safe_pickle.UnsafePickleError as e:
    raise DataError(f"{refs_path} is refused and was not run: {e}. Get the refer "
                    "annotations again from the official source (README, \"Data\")") from None
  except Exception as e:  # pylint: disable=broad-except  # Garbage bytes raise many types.
    raise DataError(f"{refs_path} is not a readable refer pickle ({type(e).__name__}: {e}); "
                    "get it again as described in the README (\"Data\")") from None
  if not isinstance(refs, list):
    raise DataError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
  for i, ref in enumerate(refs):
    problem = _ref_problem(ref)
    if problem:
      ref_id = ref.get("ref_id", "?") if isinstance(ref, dict) else "?"
      raise DataError(f"{refs_path}: ref #{i} (ref_id {ref_id!r}) {problem}; not a refer "
                      "refs pickle as the toolkit writes it: get it again as described "
                      "in the README (\"Data\")")
  try:
    inst = json.loads(inst_path.read_text())
    images = {int(i["id"]): i for i in inst["images"]}
    anns = {int(a["id"]): a for a in inst["annotations"]}
    for info in images.values():
      int(info["height"]), int(info["width"])  # pylint: disable=expression-not-assigned
  except (ValueError, KeyError, TypeError, OverflowError) as e:
    raise DataError(f"{inst_path}: not a COCO-style instances.json ({type(e).__name__}: "
                    f"{e}); get it again as described in the README") from None
  for info in images.values():  # refuse before any image is read or anything written
    safe_paths.inside(image_dir, str(info.get("file_name", "")),
                      f"{inst_path}: image {info['id']} file_name")
  return Inputs(refs, images, anns)


def _is_int(value: Any) -> bool:
  try:
    int(value)
  except (TypeError, ValueError, OverflowError):
    return False
  return not isinstance(value, bool)


def _ref_problem(ref: Any) -> str | None:
  """What makes `ref` unlike the refer toolkit's refs (None: nothing)."""
  if not isinstance(ref, dict):
    return f"is a {type(ref).__name__}, not a dict"
  missing = [k for k in ("ref_id", "ann_id", "image_id", "split", "sentences") if k not in ref]
  if missing:
    return f"has no {', '.join(repr(k) for k in missing)}"
  for key in ("ref_id", "ann_id", "image_id", "category_id"):
    if key in ref and not _is_int(ref[key]):
      return f"has {key}={ref[key]!r}, not an integer"
  if not isinstance(ref["sentences"], (list, tuple)):
    return f"has sentences of type {type(ref['sentences']).__name__}, not a list"
  for sent in ref["sentences"]:
    if not isinstance(sent, dict) or "sent_id" not in sent:
      return f"has a sentence without a sent_id: {sent!r:.80}"
    if not _is_int(sent["sent_id"]):
      return f"has sent_id={sent['sent_id']!r}, not an integer"
    if not isinstance(sent.get("raw", sent.get("sent")), str):
      return f"has sentence {sent['sent_id']!r} without its text ('raw' or 'sent')"
  return None


def _box_problem(bbox: Any, width: int, height: int) -> str | None:
  """Why a COCO (x, y, w, h) box cannot be used on a width x height image, or None."""
  try:
    x, y, w, h = (float(v) for v in bbox)
  except (TypeError, ValueError):
    return "malformed"
  if not all(np.isfinite([x, y, w, h])):
    return "NaN or infinite"
  if w < 0 or h < 0:
    return "negative size"
  if w == 0 or h == 0:
    return "zero area"
  try:
    bad_input.check_box(np.array([x, y, x + w, y + h]), width, height)
  except BadSample:
    return "outside the image"
  return None


def inputs_digest(refs_path: Path, inst_path: Path, image_dir: str | os.PathLike) -> str:
  """sha256 of the annotation files and the image list (names, sizes, mtimes)."""
  h = hashlib.sha256()
  for p in (refs_path, inst_path):
    h.update(p.read_bytes())
  listing = []
  for dirpath, _, files in os.walk(image_dir):
    for f in files:
      st = os.stat(os.path.join(dirpath, f))
      listing.append(f"{os.path.relpath(os.path.join(dirpath, f), image_dir)}\t"
                     f"{st.st_size}\t{st.st_mtime_ns}")
  h.update("\n".join(sorted(listing)).encode("utf-8", "surrogateescape"))
  return h.hexdigest()


class Refer(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Referring expressions from refer-layout annotation files."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = list(_KNOWN_CONFIGS.values())

  def __init__(self, *, inputs: Inputs | None = None,
               image_dir: str | os.PathLike | None = None,
               max_bad_fraction: float = 0.01, **kwargs: Any):
    self._inputs = inputs
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

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._inputs is None or self._image_dir is None:
      raise DataError("building refer datasets needs its inputs (use refer_builder.build)")
    refs, images, anns = self._inputs.refs, self._inputs.images, self._inputs.anns
    by_split: dict[str, list[dict]] = collections.defaultdict(list)
    for r in refs:
      by_split[str(r["split"])].append(r)
    return {split: self._generate_examples(rs, images, anns, split)
            for split, rs in sorted(by_split.items())}

  def _find_image(self, file_name: str) -> Path | None:
    direct = self._image_dir / file_name  # checked by `read_inputs`
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
    bad_boxes: collections.Counter = collections.Counter()
    boxes_seen = 0
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
      if path.stat().st_size > images_lib.MAX_IMAGE_BYTES:
        bad["image too large"] += 1
        continue
      data = path.read_bytes()
      try:
        width, height = Image.open(io.BytesIO(data)).size  # header only
      except Exception:  # PIL raises many types for garbage input
        bad["image unreadable"] += 1
        continue
      exprs, boxes, ref_ids, expr_ids, ann_ids, cats = [], [], [], [], [], []
      for r in sorted(by_image[image_id], key=lambda r: int(r["ref_id"])):
        ann = anns.get(int(r["ann_id"]))
        if ann is None:
          bad["annotation missing"] += 1
          continue
        boxes_seen += 1
        problem = _box_problem(ann.get("bbox"), width, height)
        if problem:
          bad_boxes[problem] += 1
          if sum(bad_boxes.values()) <= 3:
            log.warning("%s: ref %s (annotation %s) skipped: box %s is %s for its %dx%d "
                        "image", split, r["ref_id"], r["ann_id"], ann.get("bbox"), problem,
                        width, height)
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
    nboxes = sum(bad_boxes.values())
    if nboxes:
      log.warning("refer %s/%s: %d of %d boxes bad, their refs skipped (%s)",
                  self.builder_config.name, split, nboxes, boxes_seen, dict(bad_boxes))
    if boxes_seen and nboxes / boxes_seen > self._max_bad_fraction:
      raise DataError(
          f"refer {self.builder_config.name} split {split}: {nboxes} of {boxes_seen} boxes "
          f"are bad ({', '.join(f'{k}: {n}' for k, n in bad_boxes.items())}), more than "
          f"--max-bad-fraction={self._max_bad_fraction}; check the annotations' bbox "
          "values in instances.json (x, y, width, height in pixels)")


def build(refer_root: str | os.PathLike, dataset: str, split_by: str,
          image_dir: str | os.PathLike, data_dir: str | os.PathLike,
          max_bad_fraction: float = 0.01, overwrite: bool = False) -> Path:
  """Builds `refer/<dataset>_<split_by>` under data_dir; returns its dir.

  An existing build of the same inputs is reused; of other inputs, it is refused
  unless `overwrite` (then rebuilt).
  """
  refs_path, inst_path = check_inputs(refer_root, dataset, split_by, image_dir)
  inputs = read_inputs(refs_path, inst_path, image_dir)  # before TFDS makes dirs
  digest = inputs_digest(refs_path, inst_path, image_dir)
  path = Path(os.fspath(data_dir)) / "refer" / config_name(dataset, split_by) / VERSION
  stamp = path / INPUTS_FILE
  if (path / "dataset_info.json").is_file():
    old = stamp.read_text().strip() if stamp.is_file() else None
    if old == digest:
      log.info("%s is up to date with its inputs", path)
      return path
    if not overwrite:
      why = ("its annotations or image list changed since" if old else
             f"it has no {INPUTS_FILE} recording what it was built from")
      raise DataError(f"{path} already exists and {why}: pass --overwrite to rebuild it "
                      "from the current inputs")
    log.warning("rebuilding %s (--overwrite)", path)
    shutil.rmtree(path)
  from data_pipelines.tfds_compat import patch_importlib_resources
  patch_importlib_resources()
  builder = Refer(inputs=inputs, image_dir=image_dir, max_bad_fraction=max_bad_fraction,
                  config=make_config(dataset, split_by), data_dir=os.fspath(data_dir),
                  file_format="array_record")
  builder.download_and_prepare()
  assert Path(os.fspath(builder.data_path)) == path, (builder.data_path, path)
  tmp = stamp.with_name(INPUTS_FILE + ".tmp")
  tmp.write_text(digest + "\n")
  os.replace(tmp, stamp)
  return path
