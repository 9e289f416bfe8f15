"""`scanformer serve`: the JSON endpoint over HTTP on 127.0.0.1, and the page in Chromium."""

import base64
import io
import json
import os
import re
import shutil
import threading
import urllib.error
import urllib.request
from concurrent import futures

import numpy as np
import pytest
from PIL import Image

import scanformer_jax
from chromium_setup import find_or_install_chromium, run_headless
from scanformer_jax.serve import app
from scanformer_jax.visualize.scan_picture import scale_colour
from tiny_run import tiny_run
from visualize_fixtures import noise

TEXT = "the small red square"


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
  return scanformer_jax.load(tiny_run(tmp_path_factory), batch_size=4)


@pytest.fixture(scope="module")
def server(predictor):
  srv = app.make_server(predictor, "127.0.0.1", 0)
  thread = threading.Thread(target=srv.serve_forever, daemon=True)
  thread.start()
  yield srv
  srv.shutdown()
  srv.server_close()
  srv.state.batcher.close()


def _url(server, path="/predict"):
  return f"http://127.0.0.1:{server.server_address[1]}{path}"


def _post(server, body: bytes, content_type: str, query: str = ""):
  request = urllib.request.Request(_url(server) + query, data=body,
                                   headers={"Content-Type": content_type})
  try:
    with urllib.request.urlopen(request, timeout=300) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _png(seed=0, size=(60, 90)) -> bytes:
  out = io.BytesIO()
  Image.fromarray(noise(*size, seed=seed)).save(out, format="PNG")
  return out.getvalue()


def _json_body(image: bytes, text, **extra) -> bytes:
  return json.dumps({"image": base64.b64encode(image).decode(), "text": text,
                     **extra}).encode()


def test_predict_json_equals_the_python_api(server, predictor):
  image = _png()
  status, out = _post(server, _json_body(image, TEXT, picture=True), "application/json")
  assert status == 200, out
  want = predictor(Image.open(io.BytesIO(image)), TEXT).to_json()
  for key in ("box", "boxes_per_scale", "keep_ratio", "truncated", "image_size"):
    assert out[key] == want[key], key
  assert out["patches"] == [4, 16] and len(out["patches_read"]) == 2
  assert out["exit_scale"] == 1 and out["latency_ms"] >= 0
  assert out["picture"].startswith("data:image/png;base64,")
  picture = Image.open(io.BytesIO(base64.b64decode(out["picture"].split(",", 1)[1])))
  assert picture.size[0] > 2 * 90
  # The same query as raw bytes (curl --data-binary) and as a form (curl -F).
  status, raw = _post(server, image, "image/png", "?text=the+small+red+square")
  assert status == 200 and raw["box"] == out["box"]
  boundary = "XyZ"
  form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\n{TEXT}\r\n"
          f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
          f"filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + image + \
      f"\r\n--{boundary}--\r\n".encode()
  status, formed = _post(server, form, f"multipart/form-data; boundary={boundary}")
  assert status == 200 and formed["box"] == out["box"]


@pytest.mark.parametrize("body, content_type, status, message", [
    (b"this is not an image", "image/png", 400, "not a usable image"),
    (_json_body(b"GIF89a-broken", TEXT), "application/json", 400, "not a usable image"),
    (_json_body(_png(), "   "), "application/json", 400, "empty expression"),
    (_json_body(_png(), " ".join(["word"] * 10000)), "application/json", 400,
     "over the limit"),
    (_json_body(_png(), None), "application/json", 400, 'missing "text"'),
    (b"{not json", "application/json", 400, "invalid JSON"),
    (json.dumps({"image": "%%%", "text": TEXT}).encode(), "application/json", 400,
     "not valid base64"),
    (b"x" * (50 * 2**20), "image/jpeg", 413, "over the 20 MB limit"),
    (b"text=x", "text/plain", 415, "cannot read a text/plain body"),
], ids=["not-image", "broken-gif", "empty-text", "10k-words", "no-text", "bad-json",
        "bad-base64", "50MB", "text-body"])
def test_bad_input_is_a_readable_4xx(server, body, content_type, status, message):
  got_status, out = _post(server, body, content_type, "?text=x")
  assert got_status == status and message in out["error"], out
  assert "Traceback" not in out["error"] and "0x" not in out["error"]


def test_routes(server):
  with urllib.request.urlopen(_url(server, "/"), timeout=60) as response:
    page = response.read().decode()
  assert 'id="text"' in page and 'type="file"' in page
  with urllib.request.urlopen(_url(server, "/samples.json"), timeout=60) as response:
    samples = json.loads(response.read())["samples"]
  assert len(samples) == 3 and all(s["text"] for s in samples)
  for path, code in (("/nope", 404), ("/predict", 405), ("/samples/9.png", 404)):
    with pytest.raises(urllib.error.HTTPError) as e:
      urllib.request.urlopen(_url(server, path), timeout=60)
    assert e.value.code == code


def test_sixteen_concurrent_requests_are_all_answered(server, predictor):
  images = [_png(seed=k) for k in range(16)]
  with futures.ThreadPoolExecutor(16) as pool:
    answers = list(pool.map(lambda im: _post(server, _json_body(im, TEXT),
                                             "application/json"), images))
  assert [status for status, _ in answers] == [200] * 16
  for image, (_, out) in zip(images, answers):
    want = predictor(Image.open(io.BytesIO(image)), TEXT).boxes[-1]
    np.testing.assert_allclose(out["box"], want, atol=0.011)
  sizes = server.state.batcher.batch_sizes
  assert max(sizes) <= 4 and sum(sizes) >= 16


def test_the_page_in_headless_chromium(server, tmp_path):
  """Pick a sample, type, submit (the page's ?sample=&text=&submit= hooks drive the
  same code as a click and an upload); the result shows, the screenshot has the boxes."""
  chromium = find_or_install_chromium()
  page = _url(server, "/?sample=1&text=the%20red%20square")  # sample 1: no green objects
  dom = run_headless(chromium, str(tmp_path / "profile"),
                     ["--dump-dom", "--virtual-time-budget=60000", page + "&submit=1"])
  assert 'data-state="done"' in dom, dom[-2000:]
  assert re.search(r'id="summary">Box [\d.]+, [\d.]+, [\d.]+, [\d.]+ px; exit scale 1', dom)
  assert dom.count("<tr>") == 3  # the header and one row per scale
  assert 'id="picture" alt="scan picture' in dom and 'src="data:image/png;base64,' in dom

  def answer_colour_pixels(url: str, name: str) -> int:
    shot = tmp_path / name
    run_headless(chromium, str(tmp_path / "profile"),
                 ["--window-size=1200,1400", f"--screenshot={shot}",
                  "--virtual-time-budget=60000", url])
    if os.environ.get("SCANFORMER_KEEP_SCREENSHOT") and name == "after.png":
      shutil.copy(shot, os.environ["SCANFORMER_KEEP_SCREENSHOT"])  # for a person to see
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    return int((np.abs(pixels - np.array(scale_colour(1))).sum(-1) < 30).sum())

  before = answer_colour_pixels(page, "before.png")
  after = answer_colour_pixels(page + "&submit=1", "after.png")
  assert after - before > 500, (before, after)  # the answer's box, beyond its swatch


def test_warm_up_compiles_every_batch_size_the_batcher_forms(tmp_path_factory):
  fresh = scanformer_jax.load(tiny_run(tmp_path_factory), batch_size=4)
  assert app.warm_up(fresh, app.synthetic_samples(1), 4) == [1, 2, 4]
  assert fresh.trace_count == 3
  fresh.predict_batch([noise(50, 50)] * 3, [TEXT] * 3)  # bucket 4: compiled already
  assert fresh.trace_count == 3
