"""`scanformer predict --input queries.jsonl --output preds.jsonl`: one output line per
input line, in order; bad lines become counted error lines and the run goes on."""

import json

import pytest
from PIL import Image

from scanformer_jax.cli import predict as predict_cmd
from tiny_run import tiny_run
from visualize_fixtures import noise


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tiny_run(tmp_path_factory)


def test_jsonl_round_trip_with_bad_lines(workdir, tmp_path, capsys):
  Image.fromarray(noise(70, 100, seed=1)).save(tmp_path / "a.png")
  Image.fromarray(noise(64, 48, seed=2)).save(tmp_path / "b.png")
  (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
  lines = [
      json.dumps({"image": "a.png", "text": "the red square", "id": "first"}),
      json.dumps({"image": "missing.png", "text": "the red square", "id": "missing"}),
      json.dumps({"image": str(tmp_path / "b.png"), "text": "the blue circle", "id": 3}),
      json.dumps({"image": "corrupt.png", "text": "the red square", "id": "corrupt"}),
      json.dumps({"image": "a.png", "text": "  ", "id": "empty"}),
      '{"image": "a.png", "text": ',  # invalid JSON
      json.dumps({"image": "b.png", "text": "the small green triangle on the left of it"}),
  ]
  queries = tmp_path / "queries.jsonl"
  queries.write_text("\n".join(lines) + "\n")
  preds, pictures = tmp_path / "out" / "preds.jsonl", tmp_path / "pictures"
  rc = predict_cmd.main(["--workdir", str(workdir), "--input", str(queries), "--output",
                         str(preds), "--out-dir", str(pictures), "--batch-size", "2",
                         "--no-progress"])
  assert rc == 0
  err = capsys.readouterr().err
  assert "3 predicted, 4 errors" in err
  rows = [json.loads(line) for line in preds.read_text().splitlines()]
  assert [r["line"] for r in rows] == list(range(1, 8))  # every line, in order
  assert [r["id"] for r in rows] == ["first", "missing", 3, "corrupt", "empty", None, None]
  errors = {r["line"]: r["error"] for r in rows if "error" in r}
  assert sorted(errors) == [2, 4, 5, 6]
  assert "image not found" in errors[2] and "missing.png" in errors[2]
  assert "bad image" in errors[4]
  assert "empty expression" in errors[5]
  assert "--text" not in errors[5] and '"text"' in errors[5]  # worded for the JSONL line
  assert "invalid JSON" in errors[6]
  good = [r for r in rows if "error" not in r]
  assert [r["image_size"] for r in good] == [[70, 100], [64, 48], [64, 48]]
  for r in good:
    assert r["box"] == r["boxes_per_scale"][-1] and len(r["boxes_per_scale"]) == 2
    assert len(r["keep_ratio"]) == 2 and len(r["pred_iou"]) == 2
    h, w = r["image_size"]
    x0, y0, x1, y1 = r["box"]
    assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
    assert Image.open(r["out"]).size[0] > 2 * w  # a scan picture: two panels
  assert [r["truncated"] for r in good] == [False, False, True]
  assert sorted(p.name for p in pictures.iterdir()) == [
      "line_000001.png", "line_000003.png", "line_000007.png"]

  # The batched answer equals the one-query answer.
  rc = predict_cmd.main(["--workdir", str(workdir), "--image", str(tmp_path / "a.png"),
                         "--text", "the red square"])
  assert rc == 0
  single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  for a, b in zip(single["boxes_per_scale"], good[0]["boxes_per_scale"]):
    assert a == pytest.approx(b, abs=0.05)


def test_unwritable_out_extension_fails_before_inference(workdir, tmp_path, capsys):
  Image.fromarray(noise(64, 64)).save(tmp_path / "a.png")
  rc = predict_cmd.main(["--workdir", str(workdir), "--step", "999", "--image",
                         str(tmp_path / "a.png"), "--text", "the red square", "--out",
                         str(tmp_path / "scan.unknownext")])
  assert rc == 2  # the extension is checked first: step 999 would fail later
  err = capsys.readouterr().err
  assert "scan.unknownext" in err and ".png" in err and "Traceback" not in err


def test_unsaved_step_lists_the_saved_ones(workdir, tmp_path, capsys, caplog):
  Image.fromarray(noise(64, 64)).save(tmp_path / "a.png")
  rc = predict_cmd.main(["--workdir", str(workdir), "--step", "123", "--image",
                         str(tmp_path / "a.png"), "--text", "the red square"])
  assert rc == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].endswith("saved steps: 2 (pass one of them to --step)"), err
  assert "corrupt" not in err[-1]
  # The read-only manager's orbax notices are silenced (they reach no handler).
  assert not any("read only" in r.getMessage() or "read_only" in r.getMessage()
                 for r in caplog.records), caplog.text
