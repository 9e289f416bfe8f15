"""`scanformer export`: the artifact answers as `predict` does, and runs standalone."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import scanformer_jax
import train_helpers
from scanformer_jax import cli, export as export_lib
from scanformer_jax.errors import UserError
from scanformer_jax.predictor import read_image
from tiny_run import tiny_run
from visualize_fixtures import noise

LONG = "the small red square on the left of the big blue circle below the green one"
# Runs the runner with scanformer_jax and data_pipelines made unimportable.
_STANDALONE = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split(".")[0] in ("scanformer_jax", "data_pipelines"):
      raise ImportError("standalone runner imported " + name)
sys.meta_path.insert(0, Block())
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("export") / "model"
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("SCANFORMER_NO_CACHE", "1")  # keep this test process's jax config as it is
    assert cli.main(["export", "--workdir", str(run_dir), "--out", str(out),
                     "--batch-size", "2"]) == 0
  return out


@pytest.fixture(scope="module")
def predictor(run_dir):
  return scanformer_jax.load(run_dir, batch_size=2)


def _inputs(tmp_path):
  path = tmp_path / "photo.png"
  Image.fromarray(noise(70, 100, seed=1)).save(path)
  exif = Image.Exif()
  exif[0x0112] = 6  # rotated on view
  phone = tmp_path / "phone.jpg"
  Image.fromarray(noise(40, 100, seed=4)).save(phone, exif=exif)
  return [(str(path), "the red square"), (str(phone), "the blue circle"),
          (Image.fromarray(noise(64, 48, seed=2)), "the green one"),
          (noise(90, 50, seed=3), LONG)]


def test_exported_boxes_equal_predict(predictor, exported, tmp_path):
  model = scanformer_jax.load(exported)
  assert isinstance(model, export_lib.ExportedPredictor) and model.step == predictor.step
  inputs = _inputs(tmp_path)
  batched = model.predict_batch([i for i, _ in inputs], [t for _, t in inputs])
  for (image, text), from_batch in zip(inputs, batched):
    want, got = predictor(image, text), model(image, text)
    for answer in (got, from_batch):
      assert answer.image_size == want.image_size and answer.truncated == want.truncated
      np.testing.assert_allclose(answer.boxes, want.boxes, rtol=1e-5, atol=1e-4)
      np.testing.assert_allclose(answer.pred_iou, want.pred_iou, rtol=1e-5, atol=1e-6)
      assert answer.keep_ratio == want.keep_ratio
    picture = got.scan_picture(read_image(image))  # the export's meta draws it too
    assert picture.ndim == 3 and picture.shape[0] > want.image_size[0]


def test_runner_needs_no_project_code(predictor, exported, tmp_path):
  (image, text), = _inputs(tmp_path)[:1]
  env = train_helpers.subprocess_env({"PYTHONPATH": ""})
  proc = subprocess.run([sys.executable, "-c", _STANDALONE, str(exported / "run_exported.py"),
                         "--image", image, "--text", text], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = json.loads(proc.stdout)
  want = predictor(image, text).to_json()
  assert set(want) <= set(line)
  np.testing.assert_allclose(line["box"], want["box"], atol=0.011)
  assert line["keep_ratio"] == want["keep_ratio"] and line["truncated"] is False
  bad = subprocess.run([sys.executable, str(exported / "run_exported.py"), "--image",
                        str(tmp_path / "none.png"), "--text", text], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
  assert bad.returncode == 2 and "image not found" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_the_artifact_says_how_to_serve_it(exported):
  spec = json.loads((exported / "export.json").read_text())
  assert spec["batch_size"] == 2 and spec["mode"] == "sparse"
  readme = (exported / "README.md").read_text()
  assert "StableHLO" in readme and "does not include" in readme


def test_bad_export_requests(run_dir, tmp_path):
  with pytest.raises(UserError, match="mode"):
    export_lib.export_run(str(run_dir), str(tmp_path / "x"), mode="fast")
  with pytest.raises(UserError, match="drop step"):
    scanformer_jax.load(_fake_export(tmp_path), step=3)


def _fake_export(tmp_path):
  out = tmp_path / "fake_export"
  out.mkdir()
  (out / "export.json").write_text("{}")
  return out
