"""TFDS builder of the synthetic REC dataset (ArrayRecord, no TensorFlow needed).

Configs (expressions per split, image side):
  default  20000 / 1000 / 1000 at 256 px  (the demo)
  small      400 /  100 /  100 at 128 px  (quick experiments)
  tiny        48 /   24 /   24 at  64 px  (unit tests)
Any other size: `config_from_spec("train=5000,validation=500,test=500,size=128")`.
Splits: train, validation, test. Records use the flat layout (`flat_format`) plus
`kinds` (attribute / superlative / relation) and `colors` (the target's RGB).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import flat_format, synthetic
from data_pipelines.errors import DataError

VERSION = "1.0.0"


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  num_train: int = 20000
  num_validation: int = 1000
  num_test: int = 1000
  image_size: int = 256
  seed: int = 0


CONFIGS = {
    "default": SyntheticConfig(name="default", description="20k/1k/1k at 256 px"),
    "small": SyntheticConfig(name="small", num_train=400, num_validation=100,
                             num_test=100, image_size=128, description="400/100/100 at 128 px"),
    "tiny": SyntheticConfig(name="tiny", num_train=48, num_validation=24, num_test=24,
                            image_size=64, description="48/24/24 at 64 px"),
}


def config_from_spec(spec: str) -> SyntheticConfig:
  """A config by name, or `train=N,validation=N,test=N,size=S,seed=K` (any subset)."""
  if spec in CONFIGS:
    return CONFIGS[spec]
  keys = {"train": "num_train", "validation": "num_validation", "val": "num_validation",
          "test": "num_test", "size": "image_size", "seed": "seed"}
  values = dataclasses.asdict(CONFIGS["default"])
  fields = {}
  for part in spec.split(","):
    key, _, val = part.partition("=")
    if key.strip() not in keys or not val.strip().isdigit():
      raise DataError(
          f"bad synthetic config {spec!r}: use one of {sorted(CONFIGS)} or "
          "'train=N,validation=N,test=N,size=S,seed=K'")
    fields[keys[key.strip()]] = int(val)
  v = {k: fields.get(k, values[k]) for k in
       ("num_train", "num_validation", "num_test", "image_size", "seed")}
  if v["image_size"] < 32:
    raise DataError(f"synthetic image size must be >= 32, got {v['image_size']}")
  name = "custom_{num_train}_{num_validation}_{num_test}_{image_size}px_seed{seed}".format(**v)
  return SyntheticConfig(name=name, description=f"custom: {spec}", **v)


class Synthetic(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Coloured shapes and expressions that single out one of them."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = list(CONFIGS.values())

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
    scene_cfg = synthetic.SceneConfig(image_size=c.image_size)
    expr_id = 0
    for index, scene in synthetic.generate_split(c.seed, split, num, scene_cfg):
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


def build(data_dir: str | os.PathLike, config: str = "default") -> Path:
  """Builds `synthetic/<config>` under data_dir (idempotent); returns its dir.

  Also writes the synthetic `vocab.txt` next to the records.
  """
  from data_pipelines.tfds_compat import patch_importlib_resources
  patch_importlib_resources()
  cfg = config_from_spec(config)
  builder = Synthetic(config=cfg, data_dir=os.fspath(data_dir), file_format="array_record")
  builder.download_and_prepare()
  path = Path(os.fspath(builder.data_path))
  (path / "vocab.txt").write_text("\n".join(synthetic.vocab()) + "\n", encoding="utf-8")
  return path
