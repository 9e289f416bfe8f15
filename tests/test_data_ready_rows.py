"""Ready rows (data.ready_rows): the train split processed once into memory-mapped
uint8 arrays gives the decoding pipeline's batches, resumes exactly, counts the
samples it left out, and never uses a half-written or stale cache."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket

import numpy as np
import pytest

from data_fixtures import block_sample, synthetic_data_dir
from data_pipelines import pipeline, processing, ready_rows, synthetic
from data_pipelines.errors import DataError
from data_pipelines.tokenizer import Tokenizer
from scanformer_jax.errors import UserError

R, L, B = 64, 16, 8
DS = "synthetic/tiny"  # 48 train expressions at 64 px: 6 batches an epoch


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return synthetic_data_dir(tmp_path_factory)


def _train(data_dir, ready_dir=None, **kw):
  args = dict(image_size=R, max_text_len=L, global_batch_size=B, seed=3, num_workers=0,
              augment=None, uint8_images=True)
  if ready_dir is not None:
    args.update(ready_rows=True, ready_dir=ready_dir)
  args.update(kw)
  return pipeline.make_train_iter(DS, "train", data_dir, **args)


def _assert_same(a: dict, b: dict) -> None:
  """Every array of the two batches (meta included) equal, with the same dtype."""
  assert a.keys() == b.keys() and a["meta"].keys() == b["meta"].keys()
  pairs = [(k, a[k], b[k]) for k in a if k != "meta"]
  pairs += [(f"meta.{k}", a["meta"][k], b["meta"][k]) for k in a["meta"]]
  for key, x, y in pairs:
    assert type(x) is type(y) and x.dtype == y.dtype, key
    assert np.array_equal(x, y), key


def _cache_dirs(root):
  return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2)])
def test_ready_batches_are_the_decoding_pipelines(data_dir, tmp_path, process_index,
                                                  process_count):
  kw = dict(process_index=process_index, process_count=process_count,
            global_batch_size=B * process_count)
  decoded, ready = _train(data_dir, **kw), _train(data_dir, tmp_path, **kw)
  for _ in range(48 // B // process_count + 2):  # past the first epoch
    _assert_same(next(decoded), next(ready))
  (name,) = _cache_dirs(tmp_path)
  manifest = json.loads((tmp_path / name / "manifest.json").read_text())
  assert manifest["num_rows"] == 48 and sum(manifest["bad"].values()) == 0
  image = np.load(tmp_path / name / "image.npy", mmap_mode="r")
  assert image.shape == (48, R, R, 3) and image.dtype == np.uint8


def test_ready_iterator_resumes_exactly(data_dir, tmp_path, monkeypatch):
  it = _train(data_dir, tmp_path, seed=7)
  for _ in range(4):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(5)]  # crosses the epoch boundary
  # The rebuilt iterator reads the rows built above.
  monkeypatch.setattr(ready_rows, "_write", _must_not_build)
  fresh = _train(data_dir, tmp_path, seed=7)
  fresh.set_state(state)
  for x in want:
    _assert_same(x, next(fresh))
  assert want[-1]["meta"]["epoch"].max() == 1


def _must_not_build(*args, **kwargs):
  raise AssertionError("the ready rows were rebuilt")


def _bad_source():
  good = [block_sample(i) for i in range(16)]
  bad = [block_sample(100, image=b"\xff\xd8 definitely not a jpeg"),
         block_sample(101, text="   "),
         block_sample(102, box=[10.0, 5.0, 10.0, 20.0]),  # zero width
         block_sample(103, box=[30.0, 5.0, 90.0, 20.0])]  # beyond the 48 px width
  src = good[:6] + bad[:2] + good[6:] + bad[2:]
  for i, s in enumerate(src):
    s["index"] = i
  return src


def _train_source(src, ready_dir, **kw):
  args = dict(image_size=32, max_text_len=8, global_batch_size=4, num_workers=0,
              augment=None, uint8_images=True, source=src, max_bad_fraction=0.3,
              ready_rows=True, ready_dir=ready_dir)
  args.update(kw)
  return pipeline.make_train_iter("synthetic", "train", None, **args)


def test_bad_samples_left_out_at_build_and_counted_per_epoch(tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="data_pipelines")
  src = _bad_source()
  it = _train_source(src, tmp_path)
  rows = []
  for _ in range(8):  # 2 epochs of 16 good samples
    rows += next(it)["meta"]["index"].tolist()
  good = [s["index"] for s in src if s["image_id"] < 100]
  assert sorted(rows) == sorted(good + good)
  next(it)  # first batch of epoch 2: epoch 1 gets logged
  totals = it.stats.totals  # An epoch's skips are counted with its first row: 3 epochs.
  assert (totals["image"], totals["expression"], totals["box"]) == (3, 3, 6)
  logs = [r.getMessage() for r in caplog.records]
  assert sum("4 of 20 samples are bad and left out" in m for m in logs) == 1
  assert sum("epoch 0: 16 samples used, 4 bad skipped (image: 1, expression: 1, box: 2)"
             in m for m in logs) == 1
  (name,) = _cache_dirs(tmp_path)
  manifest = json.loads((tmp_path / name / "manifest.json").read_text())
  assert manifest["bad"] == {"image": 1, "expression": 1, "box": 2}
  assert manifest["num_rows"] == 16 and manifest["num_samples"] == 20
  # Two processes: each counts the bad samples of its own source positions.
  counts = []
  for p in range(2):
    part = _train_source(src, tmp_path, global_batch_size=4, process_index=p,
                         process_count=2)
    for _ in range(5):  # past the first epoch of 8 rows
      next(part)
    counts.append([part.stats.totals[k] for k in ("image", "expression", "box")])
  assert np.sum(counts, 0).tolist() == [2, 2, 4]


def test_too_many_bad_samples_fail_at_build_and_leave_nothing(tmp_path):
  src = _bad_source()
  src = src[2:8] + src[-2:]  # 4 good, 4 bad
  with pytest.raises(DataError, match="4 of 8 samples are bad"):
    _train_source(src, tmp_path, max_bad_fraction=0.2, global_batch_size=2)
  assert _cache_dirs(tmp_path) == []


def test_missing_or_misshapen_array_is_rebuilt(data_dir, tmp_path, caplog):
  want = [next(_train(data_dir, tmp_path)) for _ in range(1)]
  (name,) = _cache_dirs(tmp_path)
  for damage in ("missing", "misshapen", "manifest"):
    if damage == "missing":
      os.remove(tmp_path / name / "text_ids.npy")
    elif damage == "misshapen":
      # Written beside and moved over: `want`'s iterator still maps the old file, and
      # truncating a mapped file in place would kill its prefetch threads (SIGBUS).
      np.save(tmp_path / "misshapen.npy", np.zeros((47, R, R, 3), np.uint8))
      os.replace(tmp_path / "misshapen.npy", tmp_path / name / "image.npy")
    else:
      (tmp_path / name / "manifest.json").write_text('{"format": 1')
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
      got = next(_train(data_dir, tmp_path))
    assert "unusable" in caplog.text and "rebuilding" in caplog.text, damage
    _assert_same(want[0], got)
    assert _cache_dirs(tmp_path) == [name]


def test_interrupted_build_is_never_used(data_dir, tmp_path, monkeypatch):
  calls = []
  real = processing.SampleProcessor.process

  def dies_midway(self, raw, rng):
    calls.append(1)
    if len(calls) == 20:
      raise KeyboardInterrupt  # as if the run were stopped during the build
    return real(self, raw, rng)

  monkeypatch.setattr(processing.SampleProcessor, "process", dies_midway)
  with pytest.raises(KeyboardInterrupt):
    _train(data_dir, tmp_path)
  assert _cache_dirs(tmp_path) == []  # neither rows nor a temporary directory
  monkeypatch.setattr(processing.SampleProcessor, "process", real)
  # A killed build's complete-looking temporary directory (its process is gone) is
  # neither used nor kept: the rows are built anew.
  built = tmp_path / "built"
  first = next(_train(data_dir, built))
  (name,) = _cache_dirs(built)
  root = tmp_path / "other"
  root.mkdir()
  dead_pid = 2**22 + 1  # above Linux's largest pid
  orphan = root / f".{name}.tmp-{socket.gethostname()}-{dead_pid}-abc"
  shutil.copytree(built / name, orphan)
  builds = []
  real_write = ready_rows._write
  monkeypatch.setattr(ready_rows, "_write", lambda *a: builds.append(1) or real_write(*a))
  _assert_same(first, next(_train(data_dir, root)))
  assert builds == [1] and _cache_dirs(root) == [name]


def test_ready_rows_need_augmentation_off():
  from scanformer_jax import config as C
  from scanformer_jax import config_io
  with pytest.raises(UserError, match="needs data.augment=False") as e:
    C.DataConfig(ready_rows=True)
  assert "\n" not in str(e.value)
  assert C.DataConfig(ready_rows=True, augment=False).ready_rows
  with pytest.raises(UserError, match="data.augment=False"):
    config_io.apply_overrides(C.ExperimentConfig(), ["data.ready_rows=true"])
  from data_pipelines import transforms
  with pytest.raises(DataError, match="cannot be augmented"):
    pipeline.make_train_iter("synthetic", "train", None, image_size=32, max_text_len=8,
                             global_batch_size=2, source=_bad_source(), ready_rows=True,
                             augment=transforms.AugmentConfig(), uint8_images=True)


def test_cache_key_follows_image_size_text_length_and_vocab(data_dir, tmp_path):
  tok = Tokenizer(synthetic.vocab(), L)
  name = ready_rows.cache_name(DS, "train", R, L, tok)
  assert name == ready_rows.cache_name(DS, "train", R, L, Tokenizer(synthetic.vocab(), L))
  other_vocab = Tokenizer(synthetic.vocab() + ["zebra"], L)
  others = [ready_rows.cache_name(DS, "train", 32, L, tok),
            ready_rows.cache_name(DS, "train", R, 12, Tokenizer(synthetic.vocab(), 12)),
            ready_rows.cache_name(DS, "train", R, L, other_vocab),
            ready_rows.cache_name(DS, "validation", R, L, tok)]
  assert len({name, *others}) == 5
  next(_train(data_dir, tmp_path))
  next(_train(data_dir, tmp_path, image_size=32))
  assert _cache_dirs(tmp_path) == sorted([name, others[0]])


def test_train_iterator_passes_the_flag(data_dir):
  import jax
  from scanformer_jax import config as C
  from scanformer_jax import data_source, sharding
  model = C.ModelConfig.tiny(image_sizes=(16, 32), patch_size=8, max_text_len=L)
  config = C.ExperimentConfig(
      model=model, data=C.DataConfig(dataset=DS, data_dir=str(data_dir), augment=False,
                                     ready_rows=True),
      train=C.TrainConfig(batch_size=4))
  mesh = sharding.make_mesh(C.MeshConfig(data=1), jax.devices()[:1])
  batch = next(data_source.train_iterator(config, mesh))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
  name = ready_rows.cache_name(DS, "train", 32, L, Tokenizer(synthetic.vocab(), L))
  assert (data_dir / "ready" / name / "manifest.json").is_file()


def test_data_ready_command_builds_and_times(data_dir, tmp_path, capsys):
  from data_pipelines import cli
  config = tmp_path / "config.py"
  config.write_text(
      "from scanformer_jax import config as C\n"
      "def get_config():\n"
      "  return C.ExperimentConfig(\n"
      f"      model=C.ModelConfig.tiny(image_sizes=(16, 32), patch_size=8, max_text_len={L}),\n"
      f"      data=C.DataConfig(dataset={DS!r}, data_dir={str(data_dir)!r}, augment=False),\n"
      "      train=C.TrainConfig(batch_size=4))\n")
  rows = tmp_path / "rows"
  argv = ["ready", "--config", str(config), "--ready-dir", str(rows)]
  assert cli.main(argv + ["--time-batches", "2"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert "data.ready_rows=true" in lines[1]
  timed = [json.loads(line) for line in lines[2:]]
  assert [t["pipeline"] for t in timed] == ["decoding", "ready_rows"]
  assert all(t["examples_per_s"] > 0 and t["cpu_s_per_batch"] >= 0 for t in timed)
  name = ready_rows.cache_name(DS, "train", 32, L, Tokenizer(synthetic.vocab(), L))
  assert _cache_dirs(rows) == [name]
  assert cli.main(argv + ["--set", "data.augment=true"]) == 2
  err = capsys.readouterr().err.strip()
  assert "data.augment=True" in err and "\n" not in err
