"""Every input a user can get wrong, through the real `scanformer` commands.

Each case runs the command in a subprocess (as a user would) and asserts: exit code
2, a last stderr line `scanformer <cmd>: error: ...` naming what, which file and what
to do, no traceback and no library noise (absl/orbax) without --verbose, and that the
shared trained workdir (checkpoints, metrics.jsonl, config.json) is byte-for-byte what
it was. Inputs that are unusual but usable (16-bit, RGBA images; control characters,
over-long sentences) must succeed instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train_helpers

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "red", "circle"]


def _snapshot(workdir: Path) -> dict[str, str]:
  """sha256 of every file of a workdir except its lock (what a failure must not touch)."""
  out = {}
  for path in sorted(workdir.rglob("*")):
    if path.is_file() and path.name != ".lock":
      out[str(path.relative_to(workdir))] = hashlib.sha256(path.read_bytes()).hexdigest()
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny trained workdir (checkpoints 2, 4, 6), a vocab and images; never modified."""
  root = tmp_path_factory.mktemp("user_errors")
  workdir = root / "run"
  train_helpers.run_cli(["train", "--config", train_helpers.FAKE_CONFIG, "--workdir",
                         str(workdir), "--no-progress"])
  (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
  Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).save(root / "ok.png")
  snapshot = _snapshot(workdir)
  assert (workdir / "metrics.jsonl").exists() and "checkpoints/6/commit_success.txt" in snapshot
  yield root, workdir
  assert _snapshot(workdir) == snapshot, "a failing command changed the trained workdir"


def _copy(trained, tmp_path) -> Path:
  """A private copy of the trained workdir, for cases that break it."""
  _, workdir = trained
  return Path(shutil.copytree(workdir, tmp_path / "run"))


def _vocab(trained) -> list[str]:
  return ["--set", f"data.vocab_path={trained[0] / 'vocab.txt'}"]


def fails(args, *needles, verbose_ok=False) -> str:
  """Runs `scanformer <args>`, asserts the one-line failure and returns that line."""
  proc = train_helpers.run_cli(args, check=False)
  err = proc.stderr
  assert proc.returncode == 2, f"exit {proc.returncode}\n{err[-3000:]}"
  assert "Traceback" not in err, err[-3000:]
  for noise in (" absl:", " orbax", " asyncio:"):
    assert noise not in err, f"library noise {noise!r} on stderr:\n{err[-3000:]}"
  line = err.strip().splitlines()[-1]
  assert line.startswith(f"scanformer {args[0]}: error: "), err[-3000:]
  for needle in needles:
    assert needle in line, f"{needle!r} not in {line!r}"
  return line


@pytest.fixture
def fails_here(capsys, monkeypatch):
  """`fails` in this process, for errors raised before any library runs (config, --set)."""
  from scanformer_jax import cli  # pylint: disable=g-import-not-at-top
  from scanformer_jax.cli import common  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(common, "setup_logging", lambda verbose: None)

  def run(args, *needles) -> str:
    capsys.readouterr()
    rc = cli.main(list(args))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert len(err.strip().splitlines()) == 1, err[-3000:]
    assert line.startswith(f"scanformer {args[0]}: error: "), err[-3000:]
    for needle in needles:
      assert needle in line, f"{needle!r} not in {line!r}"
    return line
  return run


def succeeds(args) -> dict:
  proc = train_helpers.run_cli(args)
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------ the workdir's config.json


@pytest.mark.parametrize("command, content, message", [
    ("eval", b'{"model": {"hidden_', "is unreadable or not JSON (JSONDecodeError"),
    ("train", b"\xff\xfe\x00 garbage", "is unreadable or not JSON (UnicodeDecodeError"),
    ("predict", b"[1, 2]", "expected an object of config sections, got a list"),
    ("eval", b'{"model": 3}', "section 'model' must be an object of fields, got int"),
    ("eval", b'{"trian": {}}', "unknown section 'trian' (did you mean 'train'?)"),
    ("eval", b'{"train": {"num_step": 3}}',
     "unknown key train.num_step (did you mean 'num_steps'?)"),
], ids=["truncated", "binary", "list", "section-not-object", "section-typo", "key-typo"])
def test_bad_config_json(trained, tmp_path, fails_here, command, content, message):
  workdir = _copy(trained, tmp_path)
  (workdir / "config.json").write_bytes(content)
  before = _snapshot(workdir)
  args = {"eval": ["eval", "--workdir", str(workdir)],
          "train": ["train", "--workdir", str(workdir)],
          "predict": ["predict", "--workdir", str(workdir), "--image",
                      str(trained[0] / "ok.png"), "--text", "the red circle"]}[command]
  fails_here(args, str(workdir / "config.json"), message)
  assert _snapshot(workdir) == before  # The checkpoints and metrics are untouched.


def test_truncated_config_json_refuses_a_resume_with_config(trained, tmp_path, fails_here):
  workdir = _copy(trained, tmp_path)
  (workdir / "config.json").write_text("{")
  before = _snapshot(workdir)
  fails_here(["train", "--config", train_helpers.FAKE_CONFIG, "--workdir", str(workdir)],
        "config.json is unreadable", "restore it, or delete it and pass --config")
  assert _snapshot(workdir) == before


# ------------------------------------------------------------ --set keys and values


@pytest.mark.parametrize("override, message", [
    ("train.num_step=3", "unknown config key 'train.num_step' (did you mean 'train.num_steps'?)"),
    ("trian.num_steps=3", "unknown config key 'trian.num_steps' (did you mean "
                          "'train.num_steps'?)"),
    ("train.num_steps=abc", "train.num_steps expects an integer, got 'abc'"),
    ("loss.target_ratio=a,b", "loss.target_ratio[0] expects a number, got 'a'"),
    ("data.augment=maybe", "data.augment expects true/false, got 'maybe'"),
])
def test_bad_overrides(trained, fails_here, override, message):
  fails_here(["eval", "--workdir", str(trained[1]), "--set", override], message)


# ------------------------------------------------------------ missing directories


def test_missing_workdir(tmp_path, fails_here):
  fails_here(["eval", "--workdir", str(tmp_path / "nope")], "no config.json at",
        str(tmp_path / "nope"), "pass --config")


def test_missing_data_dir(tmp_path):
  fails(["data", "inspect", "--dataset", "synthetic", "--split", "train", "--data-dir",
         str(tmp_path / "nodata")], "is not built", str(tmp_path / "nodata"),
        "Build it with: scanformer data synthetic")
  fails(["train", "--config", str(train_helpers.ROOT / "experiments/configs/synthetic_tiny.py"),
         "--workdir", str(tmp_path / "w"), "--set", f"data.data_dir={tmp_path / 'nodata'}"],
        "is not built", "Build it with: scanformer data synthetic")
  assert not (tmp_path / "w" / "checkpoints").exists()


def _refer_root(tmp_path: Path, refs: bytes) -> Path:
  root = tmp_path / "refer"
  (root / "refclef").mkdir(parents=True)
  (root / "refclef" / "instances.json").write_text('{"images": [], "annotations": []}')
  (root / "refclef" / "refs(berkeley).p").write_bytes(refs)
  (tmp_path / "images").mkdir()
  return root


def _refer_args(root: Path, tmp_path: Path, image_dir=None) -> list[str]:
  return ["data", "refer", "--refer-root", str(root), "--dataset", "refclef", "--split-by",
          "berkeley", "--image-dir", str(image_dir or tmp_path / "images"), "--data-dir",
          str(tmp_path / "built")]


def test_missing_refer_root_and_image_dir(tmp_path):
  root = _refer_root(tmp_path, pickle.dumps([]))
  fails(_refer_args(tmp_path / "norefer", tmp_path), "missing",
        str(tmp_path / "norefer" / "refclef" / "refs(berkeley).p"), "Get the refer annotations")
  fails(_refer_args(root, tmp_path, tmp_path / "noimages"), "image directory not found",
        str(tmp_path / "noimages"))


class _Payload:
  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_refer_pickle_payload_is_refused_in_one_line(tmp_path):
  marker = tmp_path / "PAYLOAD_RAN"
  root = _refer_root(tmp_path, pickle.dumps([_Payload(str(marker))]))
  refs = root / "refclef" / "refs(berkeley).p"
  fails(_refer_args(root, tmp_path), f"{refs} is refused and was not run",
        "refusing to load global", "Get the refer annotations again")
  assert not marker.exists()
  assert not (tmp_path / "built").exists()
  refs.write_bytes(b"\x80\x04 not a pickle")
  fails(_refer_args(root, tmp_path), f"{refs} is not a readable refer pickle", "get it again")


# ------------------------------------------------------------ checkpoints


def test_workdir_without_checkpoint(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  shutil.rmtree(workdir / "checkpoints")
  fails(["predict", "--workdir", str(workdir), "--image", str(trained[0] / "ok.png"),
         "--text", "the red circle", *_vocab(trained)], "no checkpoints in",
        str(workdir / "checkpoints"), "train first")
  fails(["eval", "--workdir", str(workdir)], "no checkpoints in", "train first")


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_step_not_saved(trained, command):
  root, workdir = trained
  args = [command, "--workdir", str(workdir), "--step", "5"]
  if command == "predict":
    args += ["--image", str(root / "ok.png"), "--text", "the red circle", *_vocab(trained)]
  fails(args, f"no checkpoint at step 5 in {workdir / 'checkpoints'}", "saved steps: 2, 4, 6",
        "pass one of them to --step")


def test_garbage_checkpoint(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  for step in ("2", "4", "6"):
    params = workdir / "checkpoints" / step / "params"
    for path in params.rglob("*"):
      if path.is_file():
        path.write_bytes(b"garbage")
  before = _snapshot(workdir)
  fails(["eval", "--workdir", str(workdir)], f"checkpoint step 6 in {workdir / 'checkpoints'}",
        "is corrupt", "retrain")
  assert _snapshot(workdir) == before  # Read-only commands never move checkpoints aside.


# ------------------------------------------------------------ predict's image and text


def _write_images(root: Path) -> None:
  ok = root / "ok.png"
  (root / "corrupt.png").write_bytes(ok.read_bytes()[:60])
  (root / "zero.png").write_bytes(b"")
  Image.fromarray(np.full((1, 1, 3), 90, np.uint8)).save(root / "tiny.png")
  Image.fromarray(np.full((40, 50), 3000, np.uint16)).save(root / "i16.png")
  Image.fromarray(np.full((40, 50, 4), 100, np.uint8)).save(root / "rgba.png")


@pytest.mark.parametrize("name, message", [
    ("corrupt", "image file is truncated"),
    ("zero", "zero-byte image"),
    ("tiny", "image too small (1x1 px"),
    ("missing", "image not found"),
])
def test_bad_image(trained, tmp_path, name, message):
  root, workdir = trained
  shutil.copy(root / "ok.png", tmp_path / "ok.png")
  _write_images(tmp_path)
  path = tmp_path / f"{name}.png"
  line = fails(["predict", "--workdir", str(workdir), "--image", str(path), "--text",
                "the red circle", *_vocab(trained)], str(path), message)
  assert "pass a JPEG or PNG" in line or "check the path" in line


@pytest.mark.parametrize("name", ["i16", "rgba"])
def test_unusual_but_usable_image(trained, tmp_path, name):
  root, workdir = trained
  shutil.copy(root / "ok.png", tmp_path / "ok.png")
  _write_images(tmp_path)
  result = succeeds(["predict", "--workdir", str(workdir), "--image", str(tmp_path / f"{name}.png"),
                     "--text", "the red circle", *_vocab(trained)])
  assert result["image_size"] == [40, 50] and len(result["box"]) == 4


@pytest.mark.parametrize("text", ["", "  \t ", "\x01\x02\u200b"], ids=["empty", "space", "ctrl"])
def test_unusable_expression(trained, text):
  root, workdir = trained
  fails(["predict", "--workdir", str(workdir), "--image", str(root / "ok.png"), "--text", text,
         *_vocab(trained)], str(root / "ok.png"), "empty expression",
        "pass the words to ground with --text")


def test_long_or_odd_expression_is_answered(trained):
  """Over-long: truncated with a warning; control characters are dropped, not an error."""
  root, workdir = trained
  args = ["predict", "--workdir", str(workdir), "--image", str(root / "ok.png"),
          *_vocab(trained)]
  proc = train_helpers.run_cli(args + ["--text", "red " * 300])
  assert "longer than 8 tokens and was truncated" in proc.stderr
  result = succeeds(args + ["--text", "the red\x07 circle"])
  assert len(result["box"]) == 4


# ------------------------------------------------------------ convert-vilt, bench, init


def test_convert_vilt_sources(tmp_path):
  import test_convert_vilt  # pylint: disable=g-import-not-at-top  # Its HF fixtures.
  fails(["convert-vilt", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        str(tmp_path / "nope"), "does not exist")
  config = dict(test_convert_vilt.HF_CONFIG, intermediate_size=32)
  state = test_convert_vilt.hf_state_dict(config, np.random.default_rng(0))
  test_convert_vilt.write_hf_dir(tmp_path / "hf", state=state)  # config.json says 40
  fails(["convert-vilt", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "o")],
        "cannot convert: shape mismatch: encoder.layer.0.intermediate.dense.weight",
        "config.json matches its weights")
  assert not (tmp_path / "o").exists()


def test_bench_bad_flag():
  proc = train_helpers.run_cli(["bench", "--model", "tiny", "--keep-ratio", "2"], check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "scanformer bench: error: --keep-ratio must be in (0, 1]")


def test_vilt_config_requires_an_explicit_init_choice(tmp_path):
  """A ViLT-B/32 config never trains from scratch by omission."""
  config = str(train_helpers.ROOT / "experiments/configs/refcoco.py")
  fails(["train", "--config", config, "--workdir", str(tmp_path / "w")],
        "--set train.init_from=weights/vilt-b32", "--set train.init_from=none")
  assert not (tmp_path / "w" / "config.json").exists()


def test_verbose_shows_the_traceback_and_the_same_line(trained):
  proc = train_helpers.run_cli(["eval", "--workdir", str(trained[1]), "--step", "5",
                                "--verbose"], check=False)
  assert proc.returncode == 2 and "Traceback" in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("scanformer eval: ")]
  assert len(errors) == 1 and errors[0].startswith(
      "scanformer eval: error: no checkpoint at step 5"), proc.stderr[-3000:]
