"""TFDS builder of the synthetic REC dataset (ArrayRecord, no TensorFlow needed).

Configs (expressions per split, image side):
  default  20000 / 1000 / 1000 at 256 px  (the demo)
  small      400 /  100 /  100 at 128 px  (quick experiments)
  tiny        48 /   24 /   24 at  64 px  (unit tests)
Any other size: `config_from_spec("train=5000,validation=500,test=500,size=128")`;
also `seed=K`, `max_objects=N` (2..6), `object_scale=F` (0.5..1.5, multiplies the
object sides), `shapes=square+triangle` (draw only these of synthetic.SHAPES: fewer
shapes to tell apart) and the relative weights of the expression kinds
`attribute=4,superlative=3,relation=3` (an easier set: e.g. `relation=1`).
Splits: train, validation, test. Records use the flat layout (`flat_format`) plus
`kinds` (attribute / superlative / relation) and `colors` (the target's RGB).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import flat_format, synthetic
from data_pipelines.errors import DataError

VERSION = "1.0.0"
# Splits of at least this many expressions draw their scenes in several processes
# (about 5 ms of Python per scene; starting a process costs about 2 s).
PARALLEL_FROM = 2000


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  num_train: int = 20000
  num_validation: int = 1000
  num_test: int = 1000
  image_size: int = 256
  seed: int = 0
  max_objects: int = 6  # objects per scene: 2..max_objects
  object_scale: float = 1.0  # multiplies the object sides of synthetic.SIZE_RANGE
  shapes: tuple[str, ...] = synthetic.SHAPES  # the shapes scenes are drawn with
  # Relative weights of attribute / superlative / relation expressions.
  kind_weights: tuple[int, int, int] = (4, 3, 3)

  def scene_config(self, image_size: int | None = None) -> synthetic.SceneConfig:
    """The scene generator settings of this dataset (optionally at another size)."""
    total = sum(self.kind_weights)
    return synthetic.SceneConfig(
        image_size=image_size or self.image_size, max_objects=self.max_objects,
        object_scale=self.object_scale, shapes=self.shapes,
        kind_probs=tuple(w / total for w in self.kind_weights))


CONFIGS = {
    "default": SyntheticConfig(name="default", description="20k/1k/1k at 256 px"),
    "small": SyntheticConfig(name="small", num_train=400, num_validation=100,
                             num_test=100, image_size=128, description="400/100/100 at 128 px"),
    "tiny": SyntheticConfig(name="tiny", num_train=48, num_validation=24, num_test=24,
                            image_size=64, description="48/24/24 at 64 px"),
}


def config_from_spec(spec: str) -> SyntheticConfig:
  """A config by name, or `key=value,...` with keys train, validation, test, size,
  seed, max_objects, object_scale, shapes, attribute, superlative, relation (any
  subset; defaults as `default`)."""
  if spec in CONFIGS:
    return CONFIGS[spec]
  keys = {"train": "num_train", "validation": "num_validation", "val": "num_validation",
          "test": "num_test", "size": "image_size", "seed": "seed",
          "max_objects": "max_objects"}
  kinds = {"attribute": 0, "superlative": 1, "relation": 2}
  d = CONFIGS["default"]
  v = {k: getattr(d, k) for k in set(keys.values())}
  weights = list(d.kind_weights)
  scale, shapes = d.object_scale, d.shapes
  for part in spec.split(","):
    key, _, val = (x.strip() for x in part.partition("="))
    if key == "object_scale":
      scale = _object_scale(val, spec)
      continue
    if key == "shapes":
      shapes = _shapes(val, spec)
      continue
    if (key not in keys and key not in kinds) or not val.isdigit():
      raise DataError(
          f"bad synthetic config {spec!r}: use one of {sorted(CONFIGS)} or "
          "'train=N,validation=N,test=N,size=S' (optional: seed=K, max_objects=N, "
          "object_scale=F, shapes=A+B, attribute=W, superlative=W, relation=W)")
    if key in kinds:
      weights[kinds[key]] = int(val)
    else:
      v[keys[key]] = int(val)
  if v["image_size"] < 32:
    raise DataError(f"synthetic image size must be >= 32, got {v['image_size']}")
  if not 2 <= v["max_objects"] <= 6 or sum(weights) == 0:
    raise DataError(f"bad synthetic config {spec!r}: max_objects must be 2..6 and some "
                    "expression kind must have a positive weight")
  name = "custom_{num_train}_{num_validation}_{num_test}_{image_size}px_seed{seed}".format(**v)
  if v["max_objects"] != d.max_objects:
    name += f"_obj{v['max_objects']}"
  if tuple(weights) != d.kind_weights:
    name += "_kinds{}-{}-{}".format(*weights)
  if scale != d.object_scale:
    name += f"_scale{scale!r}"  # repr: distinct scales never share a cached dataset
  if shapes != d.shapes:
    name += "_shapes-" + "-".join(shapes)
  return SyntheticConfig(name=name, description=f"custom: {spec}", kind_weights=tuple(weights),
                         object_scale=scale, shapes=shapes, **v)


_CUSTOM_NAME = re.compile(
    r"custom_(?P<train>\d+)_(?P<validation>\d+)_(?P<test>\d+)_(?P<size>\d+)px_seed(?P<seed>\d+)"
    r"(?:_obj(?P<max_objects>\d+))?(?:_kinds(?P<kinds>\d+-\d+-\d+))?"
    r"(?:_scale(?P<object_scale>[\d.]+))?(?:_shapes-(?P<shapes>[a-z-]+))?")


def spec_from_name(name: str) -> str:
  """The `--config` spec that builds the config called `name` (inverse of the names
  `config_from_spec` gives): `custom_10_6_4_48px_seed0` -> `train=10,...,seed=0`."""
  if name in CONFIGS:
    return name
  match = _CUSTOM_NAME.fullmatch(name)
  if not match:
    raise DataError(f"unknown synthetic config {name!r}: use one of {sorted(CONFIGS)} or "
                    "a name that `scanformer data synthetic --config <spec>` printed")
  g = match.groupdict()
  spec = [f"{k}={g[k]}" for k in ("train", "validation", "test", "size", "seed")]
  if g["kinds"]:
    spec += [f"{kind}={w}" for kind, w in zip(("attribute", "superlative", "relation"),
                                              g["kinds"].split("-"))]
  spec += [f"{k}={g[k]}" for k in ("max_objects", "object_scale") if g[k]]
  if g["shapes"]:
    spec.append("shapes=" + g["shapes"].replace("-", "+"))
  return ",".join(spec)


def _object_scale(val: str, spec: str) -> float:
  try:
    scale = float(val)
  except ValueError:
    scale = float("nan")  # fails the range check below
  if not 0.5 <= scale <= 1.5:
    raise DataError(f"bad synthetic config {spec!r}: object_scale must be a number "
                    f"in 0.5..1.5, got {val!r}")
  return scale


def _shapes(val: str, spec: str) -> tuple[str, ...]:
  """`square+triangle` -> ("square", "triangle"), in synthetic.SHAPES order."""
  parts = val.split("+")
  if not set(parts) <= set(synthetic.SHAPES) or len(set(parts)) != len(parts):
    raise DataError(f"bad synthetic config {spec!r}: shapes must be distinct names from "
                    f"{'+'.join(synthetic.SHAPES)} joined by '+', got {val!r}")
  return tuple(s for s in synthetic.SHAPES if s in parts)


class Synthetic(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Coloured shapes and expressions that single out one of them."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = list(CONFIGS.values())

  # Nothing is downloaded: TFDS' "Downloading and preparing dataset ..." and
  # "... downloaded and prepared" lines would only mislead (`build` says "built").
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=flat_format.features(
            kinds=tfds.features.Tensor(shape=(None,), dtype=np.object_),
            colors=tfds.features.Tensor(shape=(None, 3), dtype=np.uint8)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    return {"train": self._generate_examples("train", c.num_train),
            "validation": self._generate_examples("validation", c.num_validation),
            "test": self._generate_examples("test", c.num_test)}

  def _generate_examples(self, split: str, num: int):
    c = self.builder_config
    scene_cfg = c.scene_config()
    expr_id = 0
    workers = min(os.cpu_count() or 1, 4) if num >= PARALLEL_FROM else 1
    for index, scene in synthetic.generate_split(c.seed, split, num, scene_cfg, workers):
      objs = [scene.objects[e.target] for e in scene.expressions]
      n = len(objs)
      yield index, {
          "image": synthetic.encode_jpeg(scene.image, scene_cfg.jpeg_quality),
          "image/id": index,
          "height": c.image_size,
          "width": c.image_size,
          "expressions": [e.text for e in scene.expressions],
          "boxes": np.array([o.box for o in objs], np.float32).reshape(n, 4),
          "object_ids": np.array([e.target for e in scene.expressions], np.int64),
          "expr_ids": np.arange(expr_id, expr_id + n, dtype=np.int64),
          "kinds": [e.kind for e in scene.expressions],
          "colors": np.array([synthetic.COLORS[o.color] for o in objs], np.uint8).reshape(n, 3),
      }
      expr_id += n


def dataset_name(spec: str) -> str:
  """The `data.dataset` value that reads what `build(data_dir, spec)` writes."""
  return "synthetic/" + config_from_spec(spec).name


def build(data_dir: str | os.PathLike, config: str = "default") -> Path:
  """Builds `synthetic/<config>` under data_dir (idempotent); returns its dir.

  Also writes the synthetic `vocab.txt` next to the records.
  """
  from data_pipelines.tfds_compat import patch_importlib_resources
  patch_importlib_resources()
  cfg = config_from_spec(config)
  builder = Synthetic(config=cfg, data_dir=os.fspath(data_dir), file_format="array_record")
  with _quiet_absl_info():
    builder.download_and_prepare()
  path = Path(os.fspath(builder.data_path))
  (path / "vocab.txt").write_text("\n".join(synthetic.vocab()) + "\n", encoding="utf-8")
  return path


@contextlib.contextmanager
def _quiet_absl_info():
  """TFDS logs every written shard at INFO ("Done writing ..."); keep the build quiet."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(max(level, logging.WARNING))
  try:
    yield
  finally:
    logger.setLevel(level)
