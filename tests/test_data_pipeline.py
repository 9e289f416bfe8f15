"""grain pipelines: contract, determinism, resumable state, eval coverage, bad inputs."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

from data_fixtures import block_sample, synthetic_data_dir
from data_pipelines import contract, pipeline, processing, synthetic, transforms
from data_pipelines.errors import DataError
from data_pipelines.tokenizer import Tokenizer

R, L, B = 64, 16, 8
DS = "synthetic/tiny"  # 48 train / 24 validation / 24 test expressions at 64 px


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return synthetic_data_dir(tmp_path_factory)


def _train(data_dir, **kw):
  args = dict(image_size=R, max_text_len=L, global_batch_size=B, seed=0, num_workers=0)
  args.update(kw)
  return pipeline.make_train_iter(DS, "train", data_dir, **args)


def _eval(data_dir, split="validation", **kw):
  args = dict(image_size=R, max_text_len=L, global_batch_size=B, num_workers=0)
  args.update(kw)
  return pipeline.make_eval_iter(DS, split, data_dir, **args)


def _same(a: dict, b: dict) -> bool:
  return (all(np.array_equal(a[k], b[k]) for k in contract.DEVICE_KEYS)
          and list(a["meta"]["expression"]) == list(b["meta"]["expression"]))


def _colour_fraction(batch: dict, row: int, rgb) -> float:
  """Fraction of the frame pixels inside the row's box that have colour `rgb`."""
  img = transforms.denormalize(batch["image"][row]).astype(int)  # [R, R, 3]
  x0, y0, x1, y1 = np.round(transforms.cxcywh_to_xyxy(batch["box"][row]) * R).astype(int)
  patch = img[y0:y1, x0:x1]
  return float((np.abs(patch - np.array(rgb)).max(-1) < 45).mean())


def _target_colour(meta: dict, row: int, split: str):
  scene = synthetic.make_scene(0, split, int(meta["image_id"][row]),
                               synthetic.SceneConfig(image_size=64))
  return synthetic.COLORS[scene.objects[int(meta["object_id"][row])].color]


def test_contract_and_boxes_on_objects_eval(data_dir):
  it = _eval(data_dir)
  batch = next(it)
  contract.check_batch(batch, B, R, L)
  assert batch["valid"].all()
  assert np.all(batch["box"] >= 0) and np.all(batch["box"] <= 1)
  tok = Tokenizer(synthetic.vocab(), L)
  for i in range(B):
    assert batch["text_ids"][i, 0] == tok.cls_id
    assert tok.decode(batch["text_ids"][i]) == batch["meta"]["expression"][i]
    assert _colour_fraction(batch, i, _target_colour(batch["meta"], i, "validation")) > 0.3
  assert "tensorflow" not in sys.modules


def test_train_batches_augmented_boxes_still_on_objects(data_dir):
  it = _train(data_dir, augment=transforms.AugmentConfig(jitter=0.0, crop_prob=0.7,
                                                         zoom_prob=0.5, flip_prob=0.5))
  flips = 0
  for _ in range(4):
    batch = next(it)
    contract.check_batch(batch, B, R, L)
    assert batch["valid"].all()
    for i in range(B):
      assert _colour_fraction(batch, i, _target_colour(batch["meta"], i, "train")) > 0.3
      flips += bool(batch["meta"]["flip"][i])
      # The box maps back to the original-pixel ground truth.
      back = transforms.box_to_original_pixels(batch["box"][i], {k: v[i] for k, v in
                                                                 batch["meta"].items()})
      np.testing.assert_allclose(back, batch["meta"]["box_orig"][i], atol=1.0)
  assert 0 < flips < 4 * B


def test_flip_swaps_words_in_batches(data_dir):
  it = _train(data_dir, augment=transforms.AugmentConfig(flip_prob=1.0, crop_prob=0, zoom_prob=0))
  ev = {int(m): e for b in _eval(data_dir, split="train") for m, e in
        zip(b["meta"]["index"], b["meta"]["expression"])}
  batch = next(it)
  assert batch["meta"]["flip"].all()
  for idx, expr in zip(batch["meta"]["index"], batch["meta"]["expression"]):
    assert expr == transforms.swap_left_right(ev[int(idx)])


def test_same_seed_same_batches_other_seed_differs(data_dir):
  a, b, c = _train(data_dir, seed=3), _train(data_dir, seed=3), _train(data_dir, seed=4)
  xs = [next(a) for _ in range(3)]
  ys = [next(b) for _ in range(3)]
  zs = [next(c) for _ in range(3)]
  assert all(_same(x, y) for x, y in zip(xs, ys))
  assert not all(_same(x, z) for x, z in zip(xs, zs))


def test_epochs_cover_all_and_reshuffle(data_dir):
  it = _train(data_dir)
  per_epoch = 48 // B
  e0 = np.concatenate([next(it)["meta"]["index"] for _ in range(per_epoch)])
  e1 = np.concatenate([next(it)["meta"]["index"] for _ in range(per_epoch)])
  assert sorted(e0) == sorted(e1) == list(range(48))
  assert not np.array_equal(e0, e1)


def test_restore_state_continues_exactly(data_dir):
  it = _train(data_dir, seed=7)
  for _ in range(4):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(5)]  # crosses the epoch boundary (6 per epoch)
  fresh = _train(data_dir, seed=7)
  fresh.set_state(state)
  got = [next(fresh) for _ in range(5)]
  assert all(_same(x, y) for x, y in zip(want, got))
  assert got[-1]["meta"]["epoch"].max() == 1


def test_orbax_checkpoint_of_iterator_state(data_dir, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain
  it = _train(data_dir, seed=2)
  next(it)
  next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt",
                             item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as m:
    m.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    m.wait_until_finished()
  want = [next(it) for _ in range(3)]
  fresh = _train(data_dir, seed=2)
  with ocp.CheckpointManager(tmp_path / "ckpt",
                             item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as m:
    m.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  got = [next(fresh) for _ in range(3)]
  assert all(_same(x, y) for x, y in zip(want, got))


@pytest.mark.parametrize("process_count", [1, 3])
def test_eval_yields_every_expression_exactly_once(data_dir, process_count):
  gb = 6 if process_count == 3 else 10  # 24 samples: 3 uneven processes / padded last
  seen, lengths = [], set()
  for p in range(process_count):
    batches = list(_eval(data_dir, global_batch_size=gb, process_index=p,
                         process_count=process_count))
    lengths.add(len(batches))
    for batch in batches:
      contract.check_batch(batch, gb // process_count, R, L)
      seen += batch["meta"]["index"][batch["valid"]].tolist()
      assert (batch["meta"]["index"][~batch["valid"]] == -1).all()
  assert sorted(seen) == list(range(24))
  assert len(lengths) == 1  # every process runs the same number of batches
  # Fixed order: a second pass gives the same sequence.
  again = [i for b in _eval(data_dir, global_batch_size=gb, process_count=process_count)
           for i in b["meta"]["index"].tolist()]
  first = [i for b in _eval(data_dir, global_batch_size=gb, process_count=process_count)
           for i in b["meta"]["index"].tolist()]
  assert again == first


def test_eval_last_batch_padded(data_dir):
  batches = list(_eval(data_dir, global_batch_size=10))
  assert len(batches) == 3
  assert batches[-1]["valid"].tolist() == [True] * 4 + [False] * 6
  assert np.all(batches[-1]["image"][4:] == 0) and np.all(batches[-1]["text_mask"][4:] == 0)


def test_train_process_shards_are_disjoint(data_dir):
  idx = []
  for p in range(2):
    it = _train(data_dir, global_batch_size=8, process_index=p, process_count=2)
    rows = np.concatenate([next(it)["meta"]["index"] for _ in range(6)])  # one epoch
    assert len(rows) == 24 and next(it)["image"].shape[0] == 4
    idx.append(set(rows.tolist()))
  assert not idx[0] & idx[1] and idx[0] | idx[1] == set(range(48))


def _bad_source():
  good = [block_sample(i) for i in range(16)]
  bad = [block_sample(100, image=b"\xff\xd8 definitely not a jpeg"),
         block_sample(101, text="   "),
         block_sample(102, box=[10.0, 5.0, 10.0, 20.0]),  # zero width
         block_sample(103, box=[30.0, 5.0, 90.0, 20.0])]  # beyond the 48 px width
  src = good + bad
  for i, s in enumerate(src):
    s["index"] = i
  return src


def test_bad_inputs_skipped_and_counted_in_training(caplog):
  caplog.set_level(logging.INFO, logger="data_pipelines")
  it = pipeline.make_train_iter("synthetic", "train", None, image_size=32, max_text_len=8,
                                global_batch_size=4, num_workers=0, source=_bad_source(),
                                max_bad_fraction=0.3)
  rows = []
  for _ in range(8):  # 2 epochs of 16 good samples
    batch = next(it)
    assert batch["valid"].all()
    rows += batch["meta"]["index"].tolist()
  assert set(rows) == set(range(16))  # bad ones never appear
  next(it)  # first batch of epoch 2: epoch 1 gets logged
  totals = it.stats.totals
  assert (totals["image"], totals["expression"], totals["box"]) == (2, 2, 4)
  logs = " ".join(r.getMessage() for r in caplog.records)
  assert "epoch 0: 16 samples used, 4 bad skipped (image: 1, expression: 1, box: 2)" in logs


def test_bad_inputs_in_eval_are_invalid_rows_counted(caplog):
  caplog.set_level(logging.INFO, logger="data_pipelines")
  it = pipeline.make_eval_iter("synthetic", "validation", None, image_size=32, max_text_len=8,
                               global_batch_size=8, num_workers=0, source=_bad_source(),
                               max_bad_fraction=0.3)
  batches = list(it)
  valid = np.concatenate([b["valid"] for b in batches])
  index = np.concatenate([b["meta"]["index"] for b in batches])
  assert sorted(index[valid].tolist()) == list(range(16))
  assert (it.stats.totals["image"], it.stats.totals["expression"], it.stats.totals["box"]) == (1, 1, 2)
  logs = [r.getMessage() for r in caplog.records if "(eval)" in r.getMessage()]
  assert logs == ["synthetic (eval) epoch 0: 16 samples used, 4 bad skipped (image: 1, "
                  "expression: 1, box: 2), 0 expressions truncated"]


def test_too_many_bad_inputs_fail_clearly():
  src = _bad_source()[12:]  # 4 good, 4 bad
  it = pipeline.make_train_iter("synthetic", "train", None, image_size=32, max_text_len=8,
                                global_batch_size=2, num_workers=0, source=src,
                                max_bad_fraction=0.2)
  with pytest.raises(DataError, match="4 of 8 samples are bad"):
    for _ in range(10):
      next(it)
  ev = pipeline.make_eval_iter("synthetic", "validation", None, image_size=32, max_text_len=8,
                               global_batch_size=2, num_workers=0, source=src,
                               max_bad_fraction=0.2)
  with pytest.raises(DataError, match="max_bad_fraction"):
    list(ev)


def test_truncation_counted(caplog):
  caplog.set_level(logging.WARNING, logger="data_pipelines")
  src = [block_sample(i, text="the left block " * 5) for i in range(8)]
  it = pipeline.make_eval_iter("synthetic", "validation", None, image_size=32, max_text_len=6,
                               global_batch_size=4, num_workers=0, source=src)
  batches = list(it)
  assert all(b["meta"]["truncated"].all() for b in batches)
  assert it.stats.totals["truncated"] == 8
  assert "8 expressions truncated" in " ".join(r.getMessage() for r in caplog.records)


def test_preprocess_single_maps_back_to_pixels():
  img = np.full((60, 100, 3), 80, np.uint8)
  img[10:30, 50:90] = (250, 20, 20)
  tok = Tokenizer(synthetic.vocab(), 12)
  batch, meta = processing.preprocess_single(img, "the red square", tok, 64, 12)
  contract.check_batch(batch, 1, 64, 12)
  assert meta["orig_size"][0].tolist() == [60, 100]
  # A "prediction" exactly on the red block, in the frame, maps back to its pixels.
  sx, sy = meta["scale"][0]
  assert sx == 64 / 100 and sy == 38 / 60  # content 64 x 38 px (rounded), top-left
  pred = transforms.xyxy_to_cxcywh(np.array([[50 * sx, 10 * sy, 90 * sx, 30 * sy]]) / 64)
  np.testing.assert_allclose(transforms.box_to_original_pixels(pred, meta)[0],
                             [50, 10, 90, 30], atol=1e-3)
  frame = transforms.denormalize(batch["image"][0])
  assert frame[int(20 * sy), int(70 * sx)].tolist() == [250, 20, 20]
  assert np.all(batch["image"][0, 38:] == 0)
  with pytest.raises(DataError):
    processing.preprocess_single(img, "  ", tok, 64, 12)


def test_worker_processes_give_same_batches_and_resume(data_dir):
  a = _train(data_dir, num_workers=0, seed=5)
  want = [next(a) for _ in range(4)]
  b = _train(data_dir, num_workers=1, seed=5)
  try:
    got = [next(b) for _ in range(2)]
    state = b.get_state()
  finally:
    b.close()
  assert all(_same(x, y) for x, y in zip(want, got))
  c = _train(data_dir, num_workers=1, seed=5)
  try:
    c.set_state(state)
    assert all(_same(x, next(c)) for x in want[2:])
  finally:
    c.close()
  # Evaluation with a worker process keeps the fixed order.
  want = [b["meta"]["index"].tolist() for b in _eval(data_dir, num_workers=0)]
  assert [b["meta"]["index"].tolist() for b in _eval(data_dir, num_workers=1)] == want
