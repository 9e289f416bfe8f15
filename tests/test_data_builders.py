"""TFDS builders: synthetic and refer build without TensorFlow; the catalog ref_coco
(built with TensorFlow) and our refer builder give the same samples as the fixture."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

import numpy as np
import pytest

from data_fixtures import make_refer_fixture, run_python
from data_pipelines import cli, pipeline, refer_builder, transforms
from data_pipelines.errors import DataError

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "green", "left", "right"]
CATALOG_SPLITS = {"train": "train", "val": "validation", "testA": "testA", "testB": "testB"}


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
  root = tmp_path_factory.mktemp("refer_fixture")
  expected = make_refer_fixture(root)
  (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
  return root, expected


@pytest.fixture(scope="module")
def refer_built(fixture):
  """Our refer builder run through the CLI in a process where TF is not importable."""
  root, _ = fixture
  data = root / "tfds"
  res = run_python(f"""
      import importlib.util, sys
      assert importlib.util.find_spec("tensorflow") is None
      from data_pipelines import cli
      rc = cli.main(["refer", "--refer-root", "{root}/refer", "--dataset", "refcoco",
                     "--split-by", "unc", "--image-dir", "{root}/images", "--data-dir", "{data}"])
      assert rc == 0, rc
      assert "tensorflow" not in sys.modules
      """, hide_tensorflow=True)
  assert res.returncode == 0, res.stderr[-3000:]
  return data


def _eval_rows(dataset, split, data_dir, vocab):
  it = pipeline.make_eval_iter(dataset, split, data_dir, image_size=64, max_text_len=8,
                               global_batch_size=4, num_workers=0, tokenizer_path=vocab)
  rows = []
  for batch in it:
    boxes = transforms.box_to_original_pixels(batch["box"], batch["meta"])
    for i in np.flatnonzero(batch["valid"]):
      m = {k: v[i] for k, v in batch["meta"].items()}
      rows.append({"expression": m["expression"], "image_id": int(m["image_id"]),
                   "expr_id": int(m["expr_id"]), "object_id": int(m["object_id"]),
                   "image_size": m["orig_size"].tolist(), "box": boxes[i].tolist(),
                   "image": batch["image"][i], "text_ids": batch["text_ids"][i]})
  return rows


def _check_against_expected(rows, expected, split):
  want = sorted((e for e in expected if e["split"] == split), key=lambda e: e["expr_id"])
  got = sorted(rows, key=lambda r: r["expr_id"])
  assert [r["expr_id"] for r in got] == [e["expr_id"] for e in want]
  for r, e in zip(got, want):
    assert r["expression"] == e["expression"]
    assert r["image_id"] == e["image_id"] and r["image_size"] == e["image_size"]
    np.testing.assert_allclose(r["box"], e["box"], atol=0.01)


def test_refer_builder_reads_back_the_fixture(fixture, refer_built):
  root, expected = fixture
  for split in CATALOG_SPLITS:
    rows = _eval_rows("refer/refcoco_unc", split, refer_built, root / "vocab.txt")
    _check_against_expected(rows, expected, split)
  assert "tensorflow" not in sys.modules


def test_catalog_ref_coco_matches_fixture_and_refer_builder(fixture, refer_built):
  if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("building the catalog ref_coco needs TensorFlow: pip install -e '.[dev]'")
  root, expected = fixture
  data = root / "tfds"
  # Build with the real TFDS `ref_coco` builder, through our CLI (TF in a subprocess).
  res = run_python(f"""
      from data_pipelines import cli
      rc = cli.main(["refcoco", "--manual-dir", "{root}/manual", "--data-dir", "{data}",
                     "--configs", "refcoco_unc"])
      assert rc == 0, rc
      """, hide_tensorflow=False)
  assert res.returncode == 0, res.stderr[-3000:]
  for ours, theirs in CATALOG_SPLITS.items():
    catalog = _eval_rows("refcoco_unc", theirs, data, root / "vocab.txt")
    _check_against_expected(catalog, expected, ours)
    # `val` works as an alias of the catalog's `validation`.
    if ours == "val":
      assert len(_eval_rows("refcoco_unc", "val", data, root / "vocab.txt")) == len(catalog)
    refer = {r["expr_id"]: r for r in _eval_rows("refer/refcoco_unc", ours, data,
                                                 root / "vocab.txt")}
    for c in catalog:
      r = refer[c["expr_id"]]
      assert c["expression"] == r["expression"] and c["object_id"] == r["object_id"]
      np.testing.assert_array_equal(c["image"], r["image"])
      np.testing.assert_array_equal(c["text_ids"], r["text_ids"])
      np.testing.assert_allclose(c["box"], r["box"], atol=0.01)
  # Reading needs no TensorFlow, also for the catalog dataset.
  res = run_python(f"""
      import json, sys
      from data_pipelines import cli
      assert cli.main(["inspect", "--dataset", "refcoco_unc", "--split", "validation",
                       "--data-dir", "{data}", "--num", "10", "--json"]) == 0
      assert "tensorflow" not in sys.modules
      """, hide_tensorflow=True)
  assert res.returncode == 0, res.stderr[-3000:]
  items = json.loads(res.stdout)
  by_text = {e["expression"]: e for e in expected if e["split"] == "val"}
  assert sorted(i["expression"] for i in items) == sorted(by_text)
  for item in items:
    e = by_text[item["expression"]]
    assert item["image_id"] == e["image_id"] and item["image_size"] == e["image_size"]
    np.testing.assert_allclose(item["box"], e["box"], atol=0.01)


def test_inspect_json_and_pngs(fixture, refer_built, tmp_path, capsys):
  root, expected = fixture
  rc = cli.main(["inspect", "--dataset", "refer/refcoco_unc", "--split", "train",
                 "--data-dir", str(refer_built), "--num", "4", "--json", "--out",
                 str(tmp_path / "png")])
  assert rc == 0
  items = json.loads(capsys.readouterr().out)
  assert len(items) == 4 and set(items[0]) == {"expression", "image_id", "image_size", "box"}
  by_text = {e["expression"]: e for e in expected if e["split"] == "train"}
  for it in items:
    e = by_text[it["expression"]]
    assert it["image_id"] == e["image_id"] and it["image_size"] == e["image_size"]
    np.testing.assert_allclose(it["box"], e["box"], atol=0.01)
  assert len(list((tmp_path / "png").glob("*.png"))) == 4
  # Fixed order: the same command prints the same list.
  cli.main(["inspect", "--dataset", "refer/refcoco_unc", "--split", "train", "--data-dir",
            str(refer_built), "--num", "4", "--json"])
  assert json.loads(capsys.readouterr().out) == items


def test_synthetic_cli_builds_and_reads_without_tensorflow(tmp_path):
  res = run_python(f"""
      import importlib.util, json, sys
      assert importlib.util.find_spec("tensorflow") is None
      from data_pipelines import cli, pipeline, contract
      assert cli.main(["synthetic", "--data-dir", "{tmp_path}", "--config",
                       "train=10,validation=6,test=4,size=48"]) == 0
      name = "synthetic/custom_10_6_4_48px_seed0"
      it = pipeline.make_train_iter(name, "train", "{tmp_path}", image_size=32,
                                    max_text_len=16, global_batch_size=4, num_workers=0)
      contract.check_batch(next(it), 4, 32, 16)
      n = sum(int(b["valid"].sum()) for b in pipeline.make_eval_iter(
          name, "test", "{tmp_path}", image_size=32, max_text_len=16, global_batch_size=4,
          num_workers=0))
      assert n == 4, n
      assert cli.main(["inspect", "--dataset", name, "--split", "validation",
                       "--data-dir", "{tmp_path}", "--num", "6", "--json"]) == 0
      assert "tensorflow" not in sys.modules
      """, hide_tensorflow=True)
  assert res.returncode == 0, res.stderr[-3000:]
  items = json.loads(res.stdout[res.stdout.index("["):])
  assert len(items) == 6 and all(i["image_size"] == [48, 48] for i in items)
  vocab = tmp_path / "synthetic" / "custom_10_6_4_48px_seed0" / "1.0.0" / "vocab.txt"
  from data_pipelines import synthetic
  assert vocab.read_text().split("\n")[:-1] == synthetic.vocab()


def test_refcoco_build_without_tensorflow_says_what_to_install(fixture, tmp_path):
  root, _ = fixture
  res = run_python(f"""
      import sys
      from data_pipelines import cli
      sys.exit(cli.main(["refcoco", "--manual-dir", "{root}/manual", "--data-dir", "{tmp_path}"]))
      """, hide_tensorflow=True)
  assert res.returncode == 2
  assert "pip install -e '.[refcoco-build]'" in res.stderr and "tensorflow" in res.stderr
  assert "Traceback" not in res.stderr


def test_user_errors_name_the_path_and_the_fix(fixture, refer_built, tmp_path, capsys):
  root, _ = fixture
  assert cli.main(["refcoco", "--manual-dir", str(tmp_path / "nope"), "--data-dir",
                   str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert str(tmp_path / "nope") in err and "refcoco.json" in err
  assert cli.main(["refer", "--refer-root", str(root / "refer"), "--dataset", "refclef",
                   "--split-by", "berkeley", "--image-dir", str(root / "images"),
                   "--data-dir", str(tmp_path)]) == 2
  assert "refs(berkeley).p" in capsys.readouterr().err
  assert cli.main(["inspect", "--dataset", "refcocog_umd", "--split", "val", "--data-dir",
                   str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "ref_coco/refcocog_umd" in err and "scanformer data refcoco" in err
  with pytest.raises(DataError, match="unknown dataset"):
    pipeline.make_eval_iter("coco", "val", tmp_path, image_size=32, max_text_len=8,
                            global_batch_size=2)
  with pytest.raises(DataError, match="no split 'dev'"):
    pipeline.make_eval_iter("refer/refcoco_unc", "dev", refer_built, image_size=32,
                            max_text_len=8, global_batch_size=2)
  with pytest.raises(DataError, match="vocab.txt"):
    pipeline.make_eval_iter("refer/refcoco_unc", "val", refer_built, image_size=32,
                            max_text_len=8, global_batch_size=2)


def test_refer_builder_skips_missing_images_and_fails_when_too_many(fixture, tmp_path,
                                                                     caplog, refer_built):
  root, expected = fixture
  images = tmp_path / "images"
  nested = images / "00" / "images"  # refclef-style nesting: found by file name
  nested.mkdir(parents=True)
  for p in (root / "images").iterdir():
    shutil.copy(p, nested / p.name)
  (nested / "COCO_train2014_000000000011.jpg").unlink()  # 1 of 2 train images missing
  with pytest.raises(DataError, match="images"):
    refer_builder.build(root / "refer", "refcoco", "unc", images, tmp_path / "a")
  path = refer_builder.build(root / "refer", "refcoco", "unc", images, tmp_path / "b",
                             max_bad_fraction=0.5)
  assert "image file missing" in caplog.text
  rows = _eval_rows("refer/refcoco_unc", "train", tmp_path / "b", root / "vocab.txt")
  assert sorted(r["expr_id"] for r in rows) == [1004, 1005, 1006]  # image 12 only
  assert path.name == "1.0.0"


def _copy_inputs(root, tmp_path):
  """A private copy of the refer fixture's annotations and images (to edit)."""
  shutil.copytree(root / "refer", tmp_path / "refer")
  shutil.copytree(root / "images", tmp_path / "images")
  return tmp_path / "refer", tmp_path / "images"


def test_rebuild_after_fixing_inputs_is_refused_without_overwrite(fixture, tmp_path, capsys):
  root, _ = fixture
  refer, images = _copy_inputs(root, tmp_path)
  held_back = tmp_path / "held_back.jpg"
  shutil.move(images / "COCO_train2014_000000000011.jpg", held_back)  # 1 of 2 train images
  data = tmp_path / "tfds"
  args = ["refer", "--refer-root", str(refer), "--dataset", "refcoco", "--split-by", "unc",
          "--image-dir", str(images), "--data-dir", str(data), "--max-bad-fraction", "0.5"]
  assert cli.main(args) == 0
  capsys.readouterr()
  assert cli.main(args) == 0  # same inputs: the build is reused
  capsys.readouterr()
  train = lambda: sorted(r["expr_id"] for r in _eval_rows("refer/refcoco_unc", "train", data,
                                                          root / "vocab.txt"))
  assert train() == [1004, 1005, 1006]
  shutil.move(held_back, images / "COCO_train2014_000000000011.jpg")  # the fix
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert "--overwrite" in err and "refer/refcoco_unc/1.0.0" in err and "Traceback" not in err
  assert train() == [1004, 1005, 1006]  # the old build is untouched
  assert cli.main(args + ["--overwrite"]) == 0
  assert train() == [1001, 1002, 1003, 1004, 1005, 1006]  # now from the fixed inputs
  capsys.readouterr()
  # A build without a record of its inputs (older version) is not trusted either.
  (data / "refer" / "refcoco_unc" / "1.0.0" / refer_builder.INPUTS_FILE).unlink()
  assert cli.main(args) == 2 and "--overwrite" in capsys.readouterr().err


def test_paths_cannot_escape_their_directories(fixture, tmp_path, capsys):
  root, _ = fixture
  refer, images = _copy_inputs(root, tmp_path / "in")
  data = tmp_path / "deep" / "data"
  base = ["--refer-root", str(refer), "--split-by", "unc", "--image-dir", str(images),
          "--data-dir", str(data)]
  for dataset in ("../../evil", "/tmp/evil", "refcoco/../x"):
    assert cli.main(["refer", "--dataset", dataset] + base) == 2
    assert f"--dataset {dataset!r} is not a plain name" in capsys.readouterr().err
  assert cli.main(["refer", "--dataset", "refcoco"] + base + ["--split-by", "../unc"]) == 2
  assert "--split-by '../unc' is not a plain name" in capsys.readouterr().err
  assert not (tmp_path / "evil").exists() and not data.exists()
  # file_name values that leave --image-dir are refused before anything is read.
  (tmp_path / "secret.jpg").write_bytes((images / "COCO_train2014_000000000011.jpg").read_bytes())
  inst_path = refer / "refcoco" / "instances.json"
  original = inst_path.read_text()
  for bad in ("../../secret.jpg", str(tmp_path / "secret.jpg")):
    inst = json.loads(original)
    inst["images"][0]["file_name"] = bad
    inst_path.write_text(json.dumps(inst))
    assert cli.main(["refer", "--dataset", "refcoco"] + base) == 2
    err = capsys.readouterr().err
    assert f"image 11 file_name {bad!r} points outside {images}" in err
    assert str(inst_path) in err and not data.exists()
  # Truncated JSON: one line naming the file.
  inst_path.write_text(original[: len(original) // 2])
  assert cli.main(["refer", "--dataset", "refcoco"] + base) == 2
  err = capsys.readouterr().err
  assert f"{inst_path}: not a COCO-style instances.json" in err and "Traceback" not in err
  # Dataset names (data.dataset, --dataset of inspect) stay inside --data-dir.
  for name in ("refer/../../evil", "synthetic/../../evil", "synthetic//etc"):
    with pytest.raises(DataError, match="is not a plain name"):
      pipeline.make_eval_iter(name, "val", data, image_size=32, max_text_len=8,
                              global_batch_size=2)
