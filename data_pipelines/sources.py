"""Dataset names -> built TFDS directories -> random access to flat samples.

Names (relative to --data-dir):
  synthetic, synthetic/<config>    our builder        synthetic/<config>/<version>/
  refcoco_unc, refcoco_google,     catalog ref_coco   ref_coco/<config>/<version>/
  refcocoplus_unc, refcocog_umd,
  refcocog_google
  refer/<dataset>_<split_by>       our refer builder  refer/<config>/<version>/
Splits are the builder's; `val` and `validation` are accepted for each other.

`SampleSource` is what grain reads: `len` = number of expressions in the split, and
item i = the i-th (image, expression, box) "raw sample" (a dict, image undecoded).
Records are opened with `tfds.builder_from_directory(...).as_data_source(...)`,
i.e. what `tfds.data_source` does, but without a registry or network lookup.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from typing import Any, Callable

import numpy as np
from etils import epath

from data_pipelines import flat_format, refcoco_catalog, safe_paths
from data_pipelines.errors import DataError

SPLIT_ALIASES = {"val": "validation", "validation": "val"}


@dataclasses.dataclass(frozen=True)
class DatasetRef:
  name: str  # as the user wrote it
  kind: str  # "flat" (our builders) or "catalog" (TFDS ref_coco)
  config_dir: epath.Path  # <data_dir>/<builder>/<config> (local or e.g. gs://)
  build_hint: str  # the command that builds it


def resolve(name: str, data_dir: str | os.PathLike) -> DatasetRef:
  """Maps a dataset name to where its built files live (does not check they exist)."""
  d = epath.Path(os.fspath(data_dir))
  if name == "synthetic" or name.startswith("synthetic/"):
    config = safe_paths.check_name(name.partition("/")[2] or "default",
                                   f"dataset {name!r}: config")
    from data_pipelines import synthetic_builder  # pylint: disable=g-import-not-at-top
    try:
      spec = synthetic_builder.spec_from_name(config)
    except DataError:
      spec = "<spec>"
    hint = f"scanformer data synthetic --data-dir {d} --config {spec}"
    return DatasetRef(name, "flat", d / "synthetic" / config, hint)
  if name in refcoco_catalog.CONFIGS:
    hint = (f"scanformer data refcoco --manual-dir <M> --data-dir {d} --configs {name}"
            " (see the README: RefCOCO manual download)")
    return DatasetRef(name, "catalog", d / "ref_coco" / name, hint)
  if name.startswith("refer/"):
    config = safe_paths.check_name(name.partition("/")[2].replace("+", "plus"),
                                   f"dataset {name!r}: config")
    ds, _, split_by = config.rpartition("_")
    hint = (f"scanformer data refer --refer-root <R> --dataset {ds or '<dataset>'} "
            f"--split-by {split_by or '<split_by>'} --image-dir <I> --data-dir {d}")
    return DatasetRef(name, "flat", d / "refer" / config, hint)
  raise DataError(
      f"unknown dataset {name!r}: use synthetic[/<config>], one of "
      f"{', '.join(refcoco_catalog.CONFIGS)}, or refer/<dataset>_<split_by> "
      "(e.g. refer/refclef_berkeley)")


def _version_key(v: str) -> tuple:
  return tuple(int(p) if p.isdigit() else -1 for p in v.split("."))


def builder_dir(ref: DatasetRef) -> epath.Path:
  """The newest built version directory of `ref`; DataError with the fix if none."""
  versions = []
  if ref.config_dir.is_dir():
    versions = [p for p in ref.config_dir.iterdir()
                if p.is_dir() and (p / "dataset_info.json").is_file()]
  if not versions:
    raise DataError(f"dataset {ref.name!r} is not built: no {ref.config_dir}/<version>/"
                    f"dataset_info.json. Build it with: {ref.build_hint}")
  return max(versions, key=lambda p: _version_key(p.name))


def _build_id(path: str) -> int:
  """Tells rebuilds of one directory apart (for the caches): dataset_info.json's
  mtime for local builds; remote builds (gs://) are taken as never rebuilt."""
  try:
    return os.stat(os.path.join(path, "dataset_info.json")).st_mtime_ns
  except OSError:
    return 0


@functools.lru_cache(maxsize=8)
def _cached_builder(path: str, build_id: int):
  del build_id  # cache key only
  import tensorflow_datasets as tfds
  return tfds.builder_from_directory(path)


# Serialises the first import of tensorflow_datasets and each builder's creation: two
# grain prefetch threads importing it at once in a fresh worker process can deadlock
# (one holds a module lock, the other a lazy module's cached_property lock).
_BUILDER_LOCK = threading.Lock()


def _builder(path: str):
  with _BUILDER_LOCK:
    return _cached_builder(path, _build_id(path))


def split_names(ref: DatasetRef) -> list[str]:
  return list(_builder(str(builder_dir(ref))).info.splits.keys())


def resolve_split(ref: DatasetRef, split: str) -> str:
  available = split_names(ref)
  if split in available:
    return split
  if SPLIT_ALIASES.get(split) in available:
    return SPLIT_ALIASES[split]
  raise DataError(f"dataset {ref.name!r} has no split {split!r}; it has {available}")


@functools.lru_cache(maxsize=32)
def _flat_index(path: str, split: str, kind: str, build_id: int) -> np.ndarray:
  """[N, 3] int32 rows (record, object, expression) for every expression."""
  del build_id  # cache key only
  records = _open_records(path, split, kind)
  counts = flat_format.num_expressions if kind == "flat" else refcoco_catalog.num_expressions
  rows = []
  for r in range(len(records)):
    for obj, n in enumerate(counts(records[r])):
      rows.extend((r, obj, e) for e in range(n))
  return np.asarray(rows, np.int32).reshape(-1, 3)


def _open_records(path: str, split: str, kind: str):
  decoders = refcoco_catalog.decoders() if kind == "catalog" else None
  return _builder(path).as_data_source(split=split, decoders=decoders)


class SampleSource:
  """Random access to the flattened samples of one split (grain data source).

  Item i is a dict: image (encoded bytes), expression (str), box (float64 [4]),
  box_format ("xyxy" pixels or "yxyx_norm"), image_id, object_id, expr_id, index.
  Picklable: worker processes reopen the ArrayRecord files themselves.
  """

  def __init__(self, dataset: str, split: str, data_dir: str | os.PathLike):
    self.ref = resolve(dataset, data_dir)
    self.path = str(builder_dir(self.ref))
    self.split = resolve_split(self.ref, split)
    self.index = _flat_index(self.path, self.split, self.ref.kind,
                             _build_id(self.path))  # [N, 3]
    self._records = None

  @property
  def name(self) -> str:
    return f"{self.ref.name}:{self.split}"

  @property
  def fingerprint(self) -> str:
    """Which build of which split: changes when the dataset is rebuilt (caches key on it)."""
    return f"{self.path}:{self.split}:{_build_id(self.path)}"

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_records"] = None
    return state

  def __len__(self) -> int:
    return len(self.index)

  def _sample_fn(self) -> Callable[[dict, int, int], dict]:
    return flat_format.sample if self.ref.kind == "flat" else refcoco_catalog.sample

  def __getitem__(self, i: int) -> dict[str, Any]:
    if self._records is None:
      self._records = _open_records(self.path, self.split, self.ref.kind)
    rec, obj, expr = (int(v) for v in self.index[i])
    out = self._sample_fn()(self._records[rec], obj, expr)
    out["index"] = int(i)
    return out

  def __repr__(self) -> str:
    return f"SampleSource({self.name}, {len(self)} samples)"
