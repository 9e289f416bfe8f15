"""The seam between experiments and the host data pipelines.

Turns `DataConfig` + mesh into this process's batch iterators: the grain pipelines
of `data_pipelines` for real and synthetic datasets, or a source registered under
`data.dataset` with `register` (the tests register an in-memory "fake" dataset,
tests/fake_data.py). Training iterators are grain `DatasetIterator`s (their state
goes into checkpoints); evaluation yields every expression once, padded batches.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator

import jax
from jax.sharding import Mesh

from scanformer_jax import sharding as sharding_lib
from scanformer_jax.config import ExperimentConfig
from scanformer_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DataSource:
  """A dataset outside `data_pipelines`: (config, global batch rows) -> iterators.

  `rows` is this process's slice of each global batch (`sharding.process_rows`).
  """

  train: Callable[[ExperimentConfig, slice], Iterator[dict]]  # Checkpointable.
  eval: Callable[[ExperimentConfig, str, slice], Iterator[dict]]


_SOURCES: dict[str, DataSource] = {}


def register(name: str, source: DataSource) -> None:
  """Makes `data.dataset=name` read `source` (a later registration replaces it)."""
  _SOURCES[name] = source


def train_iterator(config: ExperimentConfig, mesh: Mesh):
  """Endless training batches of this process's rows (a checkpointable iterator)."""
  data = config.data
  global_batch = config.train.batch_size
  sharding_lib.check_batch_size(global_batch, mesh, "train.batch_size")
  if data.dataset in _SOURCES:
    if data.ready_rows:
      raise UserError(f"data.ready_rows=True applies to the data_pipelines datasets, not to "
                      f"the registered source {data.dataset!r}: set data.ready_rows=False")
    return _SOURCES[data.dataset].train(config, sharding_lib.process_rows(mesh, global_batch))
  from data_pipelines import pipeline, transforms  # pylint: disable=g-import-not-at-top
  return pipeline.make_train_iter(
      data.dataset, data.train_split, data_dir(config), seed=data.seed,
      augment=transforms.AugmentConfig() if data.augment else None,
      uint8_images=True,  # Normalised in the train step (pixels.py): 4x less to transfer.
      ready_rows=data.ready_rows,  # Built under <data_dir>/ready on first use.
      **_common_kwargs(config, global_batch))


def eval_batches(config: ExperimentConfig, split: str, mesh: Mesh) -> Iterator[dict]:
  """Every expression of `split` once, in fixed order, padded to full batches."""
  data = config.data
  global_batch = config.eval.batch_size
  sharding_lib.check_batch_size(global_batch, mesh, "eval.batch_size")
  if data.dataset in _SOURCES:
    return _SOURCES[data.dataset].eval(config, split,
                                       sharding_lib.process_rows(mesh, global_batch))
  from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.make_eval_iter(data.dataset, split, data_dir(config),
                                 **_common_kwargs(config, global_batch))


@dataclasses.dataclass(frozen=True)
class ExpressionGroups:
  """Named groups of expressions (e.g. by the attributes they name), for per-group
  accuracy: `group_of(text)` is an index into `names`, or -1 for none."""

  names: tuple[str, ...]
  group_of: Callable[[str], int]


def expression_groups(config: ExperimentConfig):
  """The synthetic datasets' attribute groups (colour-only, size-only, shape-only,
  combined, spatial); None for other datasets."""
  name = config.data.dataset
  if name in _SOURCES or not (name == "synthetic" or name.startswith("synthetic/")):
    return None
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  return ExpressionGroups(synthetic.ATTRIBUTE_GROUPS, synthetic.attribute_group)


def data_dir(config: ExperimentConfig) -> str:
  return os.path.expanduser(config.data.data_dir)


def vocab_path(config: ExperimentConfig):
  path = config.data.vocab_path
  return os.path.expanduser(path) if path else None


def load_tokenizer(config: ExperimentConfig):
  """The tokenizer the pipelines use for this config (for `predict`)."""
  from data_pipelines import tokenizer  # pylint: disable=g-import-not-at-top
  return tokenizer.for_dataset(config.data.dataset, vocab_path(config),
                               config.model.max_text_len)


def _common_kwargs(config: ExperimentConfig, global_batch: int) -> dict:
  return dict(image_size=config.model.image_size, max_text_len=config.model.max_text_len,
              global_batch_size=global_batch, num_workers=config.data.worker_count,
              process_index=jax.process_index(), process_count=jax.process_count(),
              tokenizer_path=vocab_path(config),
              max_bad_fraction=config.data.max_bad_fraction)

