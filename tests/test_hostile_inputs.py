"""Inputs a hostile or careless user gives: special files, pickles of shared references,
undecodable query lines, outputs that overwrite inputs, unwritable outputs, odd configs.

Each case must end in a one-line error (or a counted skip, or that line's error in a
batch), promptly: never a hang, a traceback, or a silent wrong answer.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines import processing, safe_pickle
from data_pipelines.errors import DataError
from scanformer_jax.errors import UserError


# ------------------------------------------------------------------- special files


def test_shared_references_are_checked_once():
  """25 levels of a list holding its child three times: 3**25 paths, < 1 KB of pickle."""
  node = [{"sent_id": 1, "raw": "the dog"}]
  for _ in range(25):
    node = [node, node, {"k": node}]
  data = pickle.dumps(node, protocol=2)
  assert len(data) < 2500
  assert safe_pickle.loads(data)[0][2]["k"] is not None


def test_a_cycle_is_fine_and_a_deep_chain_is_refused():
  cyclic = [1]
  cyclic.append(cyclic)
  assert safe_pickle.loads(pickle.dumps(cyclic))[1][1][0] == 1
  deep = [0]
  for _ in range(100):
    deep = [deep]
  with pytest.raises(safe_pickle.UnsafePickleError, match="deeper than"):
    safe_pickle.loads(pickle.dumps(deep))


@pytest.mark.parametrize("special", ["/dev/zero", "/dev/urandom", "fifo", "directory"])
def test_special_files_are_not_read_as_images(special, tmp_path):
  if special == "fifo":
    special = tmp_path / "queries.fifo"
    os.mkfifo(special)  # Opening it would wait for a writer forever.
  elif special == "directory":
    special = tmp_path
  elif not os.path.exists(special):
    pytest.skip(f"no {special} here")
  with pytest.raises(DataError, match=f"cannot read image {special}: it is a .*, not a "
                     "regular file"):
    processing.load_image_file(special)


def test_image_files_above_the_size_limit_are_refused(tmp_path):
  path = tmp_path / "photo.png"
  Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(path)
  assert processing.load_image_file(path).shape == (32, 32, 3)
  with pytest.raises(DataError, match=r"photo.png is 0.0 MB, more than the .* MB limit"):
    processing.load_image_file(path, max_bytes=path.stat().st_size - 1)


@pytest.mark.parametrize("content", [
    b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
    b"the dog on the left\n"])
def test_files_that_are_not_images_name_the_file(content, tmp_path):
  path = tmp_path / "picture.jpg"
  path.write_bytes(content)
  with pytest.raises(DataError) as e:
    processing.load_image_file(path)
  assert str(e.value).startswith(f"bad image {path}: cannot open image: not in an image "
                                 "format")
  assert "BytesIO" not in str(e.value) and "0x" not in str(e.value)


# ------------------------------------------------------------ predict, batch and single


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  from tiny_run import tiny_run  # pylint: disable=g-import-not-at-top
  return tiny_run(tmp_path_factory)


@pytest.fixture
def photo(tmp_path) -> Path:
  path = tmp_path / "a.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)).save(path)
  return path


def _refuse_constant(name):
  raise AssertionError(f"non-standard JSON {name} in the output")


def _predict(args, capsys) -> tuple[int, str]:
  from scanformer_jax.cli import predict as predict_cmd  # pylint: disable=g-import-not-at-top
  capsys.readouterr()
  rc = predict_cmd.main(list(args) + ["--no-progress"])
  return rc, capsys.readouterr().err


def test_batch_predict_answers_every_line_whatever_it_holds(workdir, photo, tmp_path, capsys):
  good = json.dumps({"image": photo.name, "text": "the red square", "id": "ok"}).encode()
  lines = [
      good,
      b'{"image": "a.png", "text": "\\ud800", "id": "surrogate"}',  # valid JSON
      b'{"image": "a.png", "text": "caf\xe9", "id": "latin-1"}',
      b'{"image": "/dev/zero", "text": "the red square", "id": "zero"}',
      b'{"image": "a.png", "text": "the red square", "id": NaN}',
      b"[" * 100_000,
      b'{"image": "a.png", "text": "the red square", "id": 1e999}',
      json.dumps({"image": "a.png", "text": "the red\u2028square", "id": "sep"},
                 ensure_ascii=False).encode(),
      good,
  ]
  queries = tmp_path / "queries.jsonl"
  queries.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # with a UTF-8 BOM
  preds = tmp_path / "preds.jsonl"
  rc, err = _predict(["--workdir", str(workdir), "--input", str(queries), "--output",
                      str(preds), "--batch-size", "2"], capsys)
  assert rc == 0, err
  assert "3 predicted, 6 errors" in err and "Traceback" not in err
  rows = [json.loads(line, parse_constant=_refuse_constant)
          for line in preds.read_text(encoding="utf-8").splitlines()]
  assert [r["line"] for r in rows] == list(range(1, 10))
  # An undecodable line's id is unknown (null): its `line` says which it was.
  assert [r["id"] for r in rows] == ["ok", "surrogate", None, "zero", None, None, None, "sep",
                                     "ok"]
  errors = {r["line"]: r["error"] for r in rows if "error" in r}
  assert sorted(errors) == [2, 3, 4, 5, 6, 7]
  assert "invalid Unicode text (a lone surrogate, U+D800" in errors[2]
  assert "not UTF-8 text (byte 0xe9" in errors[3]
  assert "/dev/zero: it is a character device, not a regular file" in errors[4]
  assert "NaN is not a JSON number" in errors[5]
  assert "nested too deeply" in errors[6]
  assert "the number 1e999 is out of range" in errors[7]
  assert rows[0]["box"] == rows[-1]["box"] and rows[7]["text"] == "the red\u2028square"


def test_single_query_with_undecodable_text_is_one_line(workdir, photo, capsys):
  # Python hands a non-UTF-8 argument over as lone surrogates (surrogateescape).
  rc, err = _predict(["--workdir", str(workdir), "--image", str(photo), "--text",
                      b"caf\xe9".decode("utf-8", "surrogateescape")], capsys)
  assert rc == 2 and "Traceback" not in err
  assert err.strip().splitlines()[-1].startswith(
      f"scanformer predict: error: {photo}: the expression is unusable: invalid Unicode")


@pytest.mark.parametrize("spelling", ["same", "symlink", "dotdot", "hardlink"])
def test_output_may_not_overwrite_the_input(spelling, workdir, photo, tmp_path, capsys):
  queries = tmp_path / "queries.jsonl"
  content = json.dumps({"image": photo.name, "text": "the red square"}) + "\n"
  queries.write_text(content)
  (tmp_path / "sub").mkdir()
  output = {"same": queries, "dotdot": tmp_path / "sub" / ".." / "queries.jsonl",
            "symlink": tmp_path / "link.jsonl", "hardlink": tmp_path / "hard.jsonl"}[spelling]
  if spelling == "symlink":
    output.symlink_to(queries)
  elif spelling == "hardlink":
    os.link(queries, output)
  rc, err = _predict(["--workdir", str(workdir), "--input", str(queries), "--output",
                      str(output)], capsys)
  assert rc == 2 and "is the --input file: it would overwrite the queries" in err
  assert queries.read_text() == content
  rc, err = _predict(["--workdir", str(workdir), "--image", str(photo), "--text", "the dog",
                      "--out", str(tmp_path / "sub" / ".." / photo.name)], capsys)
  assert rc == 2 and "is the --image file" in err


def test_single_query_refuses_a_bad_batch_size(workdir, photo, capsys):
  rc, err = _predict(["--workdir", str(workdir), "--image", str(photo), "--text", "the dog",
                      "--batch-size", "-3"], capsys)
  assert rc == 2 and "--batch-size -3 must be >= 1" in err


def test_single_query_on_a_special_file_is_one_line(workdir, capsys):
  if not os.path.exists("/dev/zero"):
    pytest.skip("no /dev/zero here")
  rc, err = _predict(["--workdir", str(workdir), "--image", "/dev/zero", "--text", "x"], capsys)
  assert rc == 2 and "/dev/zero: it is a character device, not a regular file" in err


# ------------------------------------------------------------------ full disk


def test_tensorboard_write_error_is_one_user_error(tmp_path, monkeypatch):
  from scanformer_jax.metric_writer import MetricWriter  # pylint: disable=g-import-not-at-top
  writer = MetricWriter(str(tmp_path), enabled=True)
  writer.write(1, {"loss": 0.5})

  def full_disk(fd):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(os, "fsync", full_disk)  # The event file's flush syncs.
  with pytest.raises(UserError, match=f"cannot write {tmp_path / 'tensorboard'} \\(No space "
                     f"left on device\\); free space in {tmp_path}"):
    writer.write(2, {"loss": 0.25})
  writer.close()  # Raises nothing: the error above was the one to report.


_FILL_THE_DISK = """
import os, sys
from scanformer_jax.errors import UserError
from scanformer_jax.metric_writer import MetricWriter
mount = sys.argv[1]
writer = MetricWriter(os.path.join(mount, "run"), enabled=True)
with open(os.path.join(mount, "filler"), "wb", buffering=0) as f:
  try:
    while True:
      f.write(b"\\0" * 1024)
  except OSError:
    pass
try:
  for step in range(1, 10_000):
    writer.write(step, {"loss": 1.0 / step})
except UserError as e:
  print(e, file=sys.stderr)
finally:
  writer.close()
"""


def test_a_full_disk_ends_in_one_line_at_exit_too(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  mount = tmp_path / "tmpfs"
  mount.mkdir()
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                        capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); "
                "the monkeypatched test covers the message")
  try:
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", _FILL_THE_DISK, str(mount)], cwd=root,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"})
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  lines = run.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("cannot write "), run.stderr[-3000:]


# ---------------------------------------------------------------- configs and flags


def _cli(args, capsys) -> tuple[int, str]:
  from scanformer_jax import cli  # pylint: disable=g-import-not-at-top
  capsys.readouterr()
  rc = cli.main(list(args))
  return rc, capsys.readouterr().err


def _one_line_error(rc, err, command, *needles) -> None:
  assert rc == 2 and "Traceback" not in err, err[-3000:]
  line = err.strip().splitlines()[-1]
  assert line.startswith(f"scanformer {command}: error: "), err[-3000:]
  for needle in needles:
    assert needle in line, f"{needle!r} not in {line!r}"


@pytest.mark.parametrize("override, message", [
    ("model.patch_size=0", "model.patch_size=0 must be >= 1"),
    ("model.num_heads=0", "model.num_heads=0 must be >= 1"),
    ("model.select_threshold=1.5", "model.select_threshold=1.5 must be finite and >= 0 and <= 1"),
    ("model.select_rule=nearest", "model.select_rule='nearest' is not a registered selection "
     "rule (known: "),
    ("data.eval_splits=[]", "data.eval_splits is empty"),
])
def test_bad_config_values_are_one_line(override, message, workdir, capsys):
  rc, err = _cli(["eval", "--workdir", str(workdir), "--no-progress", "--set", override],
                 capsys)
  _one_line_error(rc, err, "eval", message)


@pytest.mark.parametrize("field, value", [("select_threshold", math.nan), ("tau", 0.0),
                                          ("layer_norm_eps", math.inf), ("patch_size", 0)])
def test_model_config_refuses_values_that_break_the_model(field, value):
  """Also from a config file or a config.json (which may hold NaN), not only --set."""
  from scanformer_jax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match=f"model.{field}={value!r} must be "):
    ModelConfig.tiny(**{field: value})


def test_exit_criterion_thresholds_must_be_finite():
  from scanformer_jax import evaluate  # pylint: disable=g-import-not-at-top
  from scanformer_jax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig.tiny(exit_heads=("iou",))
  assert evaluate.parse_criterion("iou_head:0.7", cfg).threshold == 0.7
  for spec in ("iou_head:nan", "iou_head:inf", "box_stability:-inf"):
    with pytest.raises(UserError, match=f"exit criterion '{spec}': the threshold must be a "
                       "finite number"):
      evaluate.parse_criterion(spec, cfg)


def _file(tmp_path) -> Path:
  path = tmp_path / "notes.txt"
  path.write_text("a file, not a folder\n")
  return path


@pytest.mark.parametrize("flag", ["--json", "--gallery", "--exit-sweep"])
def test_eval_checks_its_outputs_before_the_work(flag, workdir, tmp_path, capsys):
  bad = _file(tmp_path) / "out"
  extra = ["--split", "validation"] if flag != "--json" else []
  # Step 999 does not exist: an output checked first fails on the output instead.
  rc, err = _cli(["eval", "--workdir", str(workdir), "--step", "999", flag, str(bad), *extra],
                 capsys)
  _one_line_error(rc, err, "eval", f"{flag} {bad}: {bad.parent} is a file, not a directory")
  rc, err = _cli(["eval", "--workdir", str(workdir), "--step", "999", "--json", str(tmp_path)],
                 capsys)
  _one_line_error(rc, err, "eval", f"--json {tmp_path} is a directory: give a file name")


def test_predict_checks_its_outputs_before_the_model(workdir, photo, tmp_path, capsys):
  queries = tmp_path / "queries.jsonl"
  queries.write_text(json.dumps({"image": photo.name, "text": "the dog"}) + "\n")
  notes = _file(tmp_path)
  cases = [
      (["--input", str(queries), "--output", str(notes / "p.jsonl")], "--output"),
      (["--input", str(queries), "--output", str(tmp_path / "p.jsonl"), "--out-dir",
        str(notes)], "--out-dir"),
      (["--image", str(photo), "--text", "the dog", "--out", str(notes / "scan.png")], "--out"),
  ]
  for args, flag in cases:
    rc, err = _predict(["--workdir", str(workdir), "--step", "999", *args], capsys)
    assert rc == 2 and f"{flag} " in err and "not a directory" in err, err
  assert not (tmp_path / "p.jsonl").exists()


def test_other_commands_check_their_outputs_first(tmp_path, capsys):
  bad = _file(tmp_path) / "out"
  rc, err = _cli(["bench", "--model", "tiny", "--steps", "1", "--warmup", "0", "--json",
                  str(bad / "bench.json")], capsys)
  _one_line_error(rc, err, "bench", "--json ", "is a file, not a directory")
  rc, err = _cli(["data", "inspect", "--dataset", "synthetic/none", "--split", "train",
                  "--data-dir", str(tmp_path / "none"), "--out", str(bad)], capsys)
  _one_line_error(rc, err, "data", f"--out {bad}: ")
  rc, err = _cli(["convert-vilt", "--src", str(tmp_path / "none"), "--out", str(bad)], capsys)
  _one_line_error(rc, err, "convert-vilt", f"--out {bad}: ")


# ------------------------------------------------------------------- refer builds


@pytest.fixture
def refer_inputs(tmp_path):
  from data_fixtures import make_refer_fixture  # pylint: disable=g-import-not-at-top
  make_refer_fixture(tmp_path / "in")
  return tmp_path / "in" / "refer", tmp_path / "in" / "images"


def _edit_pickle(refer, edit) -> None:
  path = refer / "refcoco" / "refs(unc).p"
  refs = pickle.loads(path.read_bytes())
  edit(refs)
  path.write_bytes(pickle.dumps(refs, protocol=2))


def _set_boxes(refer, boxes: dict) -> None:
  path = refer / "refcoco" / "instances.json"
  inst = json.loads(path.read_text())
  for ann in inst["annotations"]:
    ann["bbox"] = boxes.get(ann["id"], ann["bbox"])
  path.write_text(json.dumps(inst))  # NaN is written as the bare NaN Python reads back


@pytest.mark.parametrize("edit, message", [
    (lambda refs: refs[2].pop("sentences"), "ref #2 (ref_id 3) has no 'sentences'"),
    (lambda refs: refs[0]["sentences"][1].update(sent_id="abc"),
     "ref #0 (ref_id 1) has sent_id='abc', not an integer"),
    (lambda refs: refs[4].update(image_id=None), "ref #4 (ref_id 5) has image_id=None"),
    (lambda refs: refs.append("a string"), "ref #8 (ref_id '?') is a str, not a dict"),
])
def test_malformed_refs_are_one_line_naming_the_ref(edit, message, refer_inputs, tmp_path,
                                                     capsys):
  from data_pipelines import cli  # pylint: disable=g-import-not-at-top
  refer, image_dir = refer_inputs
  _edit_pickle(refer, edit)
  rc = cli.main(["refer", "--refer-root", str(refer), "--dataset", "refcoco", "--split-by",
                 "unc", "--image-dir", str(image_dir), "--data-dir", str(tmp_path / "tfds")])
  err = capsys.readouterr().err
  assert rc == 2 and "Traceback" not in err, err[-3000:]
  assert message in err.strip().splitlines()[-1]
  assert not (tmp_path / "tfds").exists()


def test_refer_build_refuses_bad_boxes_above_the_limit(refer_inputs, tmp_path):
  from data_pipelines import refer_builder  # pylint: disable=g-import-not-at-top
  refer, image_dir = refer_inputs
  # Train refs 1, 2, 3 (annotations 101, 102, 104), on 96x64 and 64x96 images.
  _set_boxes(refer, {101: [math.nan, 6.0, 30.0, 40.0], 102: [50.0, 10.0, -40.0, 30.0],
                     104: [10.0, 20.0, 0.0, 60.0]})
  with pytest.raises(DataError, match=r"split train: 3 of 3 boxes are bad \(NaN or infinite: "
                     r"1, negative size: 1, zero area: 1\), more than --max-bad-fraction"):
    refer_builder.build(refer, "refcoco", "unc", image_dir, tmp_path / "a")


def test_refer_build_skips_and_reports_a_few_bad_boxes(refer_inputs, tmp_path, caplog):
  from data_pipelines import refer_builder, sources  # pylint: disable=g-import-not-at-top
  refer, image_dir = refer_inputs
  _set_boxes(refer, {102: [50.0, 10.0, 400.0, 30.0]})  # outside its 96x64 image
  refer_builder.build(refer, "refcoco", "unc", image_dir, tmp_path / "b",
                      max_bad_fraction=0.5)
  assert "train: 1 of 3 boxes bad, their refs skipped ({'outside the image': 1})" in caplog.text
  src = sources.SampleSource("refer/refcoco_unc", "train", tmp_path / "b")
  assert sorted(int(src[i]["expr_id"]) for i in range(len(src))) == [1001, 1002, 1004, 1005,
                                                                      1006]


# ------------------------------------------------------------------- epoch counts


def test_the_epoch_log_after_a_resume_counts_the_whole_epoch(caplog):
  import logging  # pylint: disable=g-import-not-at-top
  from data_fixtures import block_sample  # pylint: disable=g-import-not-at-top
  from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top
  src = [block_sample(i) for i in range(16)] + [block_sample(100, text="   "),
                                                block_sample(101, box=[9.0, 5.0, 9.0, 20.0])]
  for i, sample in enumerate(src):
    sample["index"] = i

  def train_iter():
    return pipeline.make_train_iter("synthetic", "train", None, image_size=32, max_text_len=8,
                                    global_batch_size=4, num_workers=0, source=src,
                                    max_bad_fraction=0.5)
  first = train_iter()
  for _ in range(2):
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # as the checkpoint stores it
  caplog.set_level(logging.INFO, logger="data_pipelines")
  resumed = train_iter()
  resumed.set_state(state)
  for _ in range(3):  # the rest of epoch 0 and the first batch of epoch 1
    next(resumed)
  logs = " ".join(r.getMessage() for r in caplog.records)
  assert "epoch 0: 16 samples used, 2 bad skipped (image: 0, expression: 1, box: 1)" in logs


def test_a_full_disk_met_anywhere_is_one_line(capsys):
  from scanformer_jax.cli import common  # pylint: disable=g-import-not-at-top

  def body(error):
    def run():
      raise error
    return run
  full = OSError(errno.ENOSPC, "No space left on device", "/runs/a/config.json.partial")
  assert common.run("scanformer train", body(full)) == 2
  assert capsys.readouterr().err == (
      "scanformer train: error: No space left on device (writing /runs/a/config.json.partial)"
      ": free space on that disk (the workdir's or the output's) and rerun the same command\n")
  with pytest.raises(PermissionError):  # Other OS errors are not the machine's state.
    common.run("scanformer train", body(PermissionError(errno.EACCES, "Permission denied")))
