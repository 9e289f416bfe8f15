"""The HTTP server of `scanformer serve`: a page for people, `POST /predict` for scripts.

Routes:
  GET  /               the demo page (page.html): upload or pick a sample, type, see
                       the scan picture, the box per scale, the patches read, the exit
                       scale and the latency
  GET  /samples.json   the sample images' names and suggested expressions
  GET  /samples/<i>.png
  GET  /health         {"ok": true, "checkpoint_step": ...}
  POST /predict        an image and an expression -> the box, as JSON. The body is
                       JSON {"image": base64 or data: URL, "text": "...", "picture":
                       false}, or the raw image bytes with ?text=... (curl
                       --data-binary), or multipart/form-data fields image and text
                       (curl -F). The answer has the fields of `scanformer predict`
                       plus patches_read, patches, exit_scale, latency_ms and, when
                       asked, picture (a PNG data: URL of the scan picture).

Bad input (not an image, an upload over --max-upload-mb, empty or over-long text,
bad JSON) is answered with HTTP 4xx and {"error": "<one line>"}; a failing forward
with 500 and the traceback in the server's log only.

Why the standard library (`http.server.ThreadingHTTPServer`) and not Gradio or an
ASGI stack: inference here is a blocking jax call, so threads that hand their query
to one batching worker (`batcher.Batcher`) are the whole concurrency story; the page
is one static file with no assets fetched from elsewhere (it works offline, and in a
headless browser test); and the demo adds no dependency to install or keep in step
with jax. It is a demo server: bind it to 127.0.0.1 (the default) or put a reverse
proxy with TLS in front of it.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import io
import json
import logging
import os
import re
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib import parse

import numpy as np
from PIL import Image

from scanformer_jax.errors import UserError
from scanformer_jax.serve.batcher import Batcher

log = logging.getLogger(__name__)

DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 20
MAX_TEXT_CHARS = 500  # A referring expression is a phrase; RefCOCOg's longest is ~300.
# Bodies over the limit are read and dropped up to this size (so the client sees the
# 413 answer instead of a reset connection), and the connection is closed beyond it.
_DRAIN_LIMIT_BYTES = 256 * 2**20
_PAGE = os.path.join(os.path.dirname(__file__), "page.html")


class RequestError(Exception):
  """A bad request: its HTTP status and a one-line message for the client."""

  def __init__(self, status: HTTPStatus, message: str):
    super().__init__(message)
    self.status = status


class ServeState:
  """What every request thread shares: the predictor, its batcher and the samples."""

  def __init__(self, predictor, samples: list[dict], max_upload_bytes: int,
               max_batch: int, max_wait_s: float = 0.01):
    self.predictor = predictor
    self.samples = samples  # [{"name", "text", "png": bytes}]
    self.max_upload_bytes = max_upload_bytes
    self.batcher = Batcher(predictor, max_batch, max_wait_s)
    with open(_PAGE, encoding="utf-8") as f:
      self.page = f.read().encode("utf-8")


# ------------------------------------------------------------------ request parsing
def decode_image(data: bytes) -> np.ndarray:
  """Encoded image bytes -> upright uint8 [H, W, 3]; RequestError 400 if unusable."""
  from data_pipelines import images  # pylint: disable=g-import-not-at-top
  from data_pipelines.bad_input import BadSample  # pylint: disable=g-import-not-at-top
  if not data:
    raise RequestError(HTTPStatus.BAD_REQUEST, "no image: send a JPEG or PNG file")
  try:
    return np.asarray(images.to_rgb(images.open_image(data)), np.uint8)
  except BadSample as e:
    detail = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", e.detail)
    raise RequestError(HTTPStatus.BAD_REQUEST,
                       f"not a usable image: {detail}; send a JPEG or PNG photo") from None


def _base64_image(value: Any) -> bytes:
  if not isinstance(value, str) or not value:
    raise RequestError(HTTPStatus.BAD_REQUEST, '"image" must be a base64 string or a '
                       'data: URL of a JPEG or PNG file')
  if value.startswith("data:"):
    value = value.split(",", 1)[-1]
  try:
    return base64.b64decode(value, validate=True)
  except (binascii.Error, ValueError):
    raise RequestError(HTTPStatus.BAD_REQUEST, '"image" is not valid base64') from None


def check_text(text: Any) -> str:
  if not isinstance(text, str):
    raise RequestError(HTTPStatus.BAD_REQUEST, 'missing "text": the expression that '
                       "names the object, e.g. \"the red square on the left\"")
  if not text.strip():
    raise RequestError(HTTPStatus.BAD_REQUEST, "empty expression: type the words that "
                       "name the object to find")
  if len(text) > MAX_TEXT_CHARS:
    raise RequestError(HTTPStatus.BAD_REQUEST, f"the expression has {len(text)} "
                       f"characters, over the limit of {MAX_TEXT_CHARS}: describe one "
                       "object in a phrase")
  return text


def parse_predict_request(content_type: str, body: bytes, query: dict) -> dict:
  """The body of POST /predict -> {"image": bytes, "text": str, "picture": bool}."""
  kind = content_type.split(";", 1)[0].strip().lower()
  flag = lambda v: str(v).lower() in ("1", "true", "yes")  # noqa: E731
  if kind == "application/json":
    try:
      item = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise RequestError(HTTPStatus.BAD_REQUEST, f"invalid JSON body: {e}") from None
    if not isinstance(item, dict):
      raise RequestError(HTTPStatus.BAD_REQUEST, "the JSON body must be an object "
                         '{"image": ..., "text": ...}')
    return {"image": _base64_image(item.get("image")), "text": item.get("text"),
            "picture": bool(item.get("picture", False))}
  if kind == "multipart/form-data":
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    fields = {part.get_param("name", header="content-disposition"): part
              for part in message.iter_parts()}
    if "image" not in fields:
      raise RequestError(HTTPStatus.BAD_REQUEST, "multipart form without an image field")
    text = fields["text"].get_content() if "text" in fields else None
    if isinstance(text, bytes):
      text = text.decode("utf-8", "replace")
    picture = fields["picture"].get_content() if "picture" in fields else "0"
    return {"image": fields["image"].get_payload(decode=True) or b"", "text": text,
            "picture": flag(picture if isinstance(picture, str) else picture.decode())}
  if kind.startswith("image/") or kind in ("application/octet-stream", ""):
    return {"image": body, "text": query.get("text", [None])[0],
            "picture": flag(query.get("picture", ["0"])[0])}
  raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"cannot read a {kind} body: "
                     "send JSON, multipart/form-data or the image bytes")


def answer(prediction, latency_s: float, step, picture: Optional[np.ndarray]) -> dict:
  """The JSON of one prediction (see the module docstring)."""
  out = prediction.to_json()
  out["patches_read"] = [int(t.sum()) for t in prediction.taken]
  out["patches"] = [int(t.size) for t in prediction.taken]
  out["exit_scale"] = len(prediction.taken) - 1  # the full scan: no early exit here
  out["latency_ms"] = round(latency_s * 1000, 1)
  out["checkpoint_step"] = None if step is None else int(step)
  if picture is not None:
    png = io.BytesIO()
    Image.fromarray(picture).save(png, format="PNG")
    out["picture"] = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
  return out


# ------------------------------------------------------------------ the handler
class Handler(BaseHTTPRequestHandler):
  """One request; `self.server.state` is the shared `ServeState`."""

  server_version = "scanformer-serve"
  protocol_version = "HTTP/1.1"

  @property
  def state(self) -> ServeState:
    return self.server.state  # type: ignore[attr-defined]

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    log.debug("%s %s", self.address_string(), format % args)

  def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "no-store")
    if self.close_connection:
      self.send_header("Connection", "close")
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _json(self, status: HTTPStatus, obj: dict) -> None:
    self._send(status, json.dumps(obj).encode("utf-8"), "application/json")

  def _error(self, status: HTTPStatus, message: str) -> None:
    self._json(status, {"error": message})

  def do_GET(self):  # pylint: disable=invalid-name
    path = parse.urlsplit(self.path).path
    if path in ("/", "/index.html"):
      return self._send(HTTPStatus.OK, self.state.page, "text/html; charset=utf-8")
    if path == "/health":
      return self._json(HTTPStatus.OK, {"ok": True,
                                        "checkpoint_step": self.state.predictor.step})
    if path == "/samples.json":
      return self._json(HTTPStatus.OK, {"samples": [
          {"url": f"/samples/{i}.png", "name": s["name"], "text": s["text"]}
          for i, s in enumerate(self.state.samples)]})
    if path.startswith("/samples/") and path.endswith(".png"):
      index = path[len("/samples/"):-len(".png")]
      if index.isdigit() and int(index) < len(self.state.samples):
        return self._send(HTTPStatus.OK, self.state.samples[int(index)]["png"], "image/png")
    if path == "/predict":
      return self._error(HTTPStatus.METHOD_NOT_ALLOWED, "POST an image and a text to "
                         "/predict (see the page at / for an example)")
    return self._error(HTTPStatus.NOT_FOUND, f"no page {path}")

  def do_POST(self):  # pylint: disable=invalid-name
    url = parse.urlsplit(self.path)
    try:
      body = self._read_body()
      if url.path != "/predict":
        raise RequestError(HTTPStatus.NOT_FOUND, f"no endpoint {url.path}: POST to /predict")
      request = parse_predict_request(self.headers.get("Content-Type", ""), body,
                                      parse.parse_qs(url.query))
      self._json(HTTPStatus.OK, self._predict(request))
    except RequestError as e:
      self._error(e.status, str(e))
    except UserError as e:  # a DataError of the predictor's preprocessing
      self._error(HTTPStatus.BAD_REQUEST, str(e))
    except Exception as e:  # pylint: disable=broad-except
      log.error("POST %s failed:\n%s", url.path, traceback.format_exc())
      self._error(HTTPStatus.INTERNAL_SERVER_ERROR,
                  f"internal error ({type(e).__name__}); the server log has the details")

  def _read_body(self) -> bytes:
    length_header = self.headers.get("Content-Length")
    if length_header is None:
      self.close_connection = True
      raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header")
    try:
      length = int(length_header)
    except ValueError:
      self.close_connection = True
      raise RequestError(HTTPStatus.BAD_REQUEST, "bad Content-Length") from None
    limit = self.state.max_upload_bytes
    if length > limit:
      if length <= _DRAIN_LIMIT_BYTES:
        left = length
        while left > 0:
          chunk = self.rfile.read(min(left, 2**20))
          if not chunk:
            break
          left -= len(chunk)
      else:
        self.close_connection = True
      raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                         f"upload of {length / 2**20:.1f} MB is over the "
                         f"{limit / 2**20:.0f} MB limit: send a smaller image")
    return self.rfile.read(length)

  def _predict(self, request: dict) -> dict:
    text = check_text(request["text"])
    image = decode_image(request["image"])
    predictor = self.state.predictor
    query = predictor.prepare(image, text, source="the uploaded image")
    start = time.perf_counter()
    prediction = self.state.batcher.submit(query).result()
    latency = time.perf_counter() - start
    picture = prediction.scan_picture(image) if request["picture"] else None
    return answer(prediction, latency, predictor.step, picture)


def warm_up(predictor, samples: list[dict], max_batch: int) -> list[int]:
  """Runs one query at every batch size the batcher can form, so that no request
  waits for a compilation; returns the sizes run."""
  from scanformer_jax.predictor import batch_buckets  # pylint: disable=g-import-not-at-top
  png = samples[0]["png"] if samples else None
  image = decode_image(png) if png else np.full((64, 64, 3), 128, np.uint8)
  query = predictor.prepare(image, (samples[0]["text"] if samples else "") or "the object")
  sizes = list(batch_buckets(max_batch)) if hasattr(predictor, "trace_count") else [1]
  for size in sizes:
    predictor.predict_queries([query] * size, max_batch)
  return sizes


def synthetic_samples(count: int = 3, size: int = 256) -> list[dict]:
  """Sample scenes from the synthetic generator, each with one of its expressions."""
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  cfg = synthetic.SceneConfig(image_size=size, max_objects=4)
  samples = []
  for index in range(count):
    scene = synthetic.make_scene(0, "test", index, cfg)
    png = io.BytesIO()
    Image.fromarray(scene.image).save(png, format="PNG")
    samples.append({"name": f"synthetic scene {index}", "text": scene.expressions[0].text,
                    "png": png.getvalue()})
  return samples


def folder_samples(folder: str) -> list[dict]:
  """Every image file of `folder` (sorted) as a sample; no suggested expression."""
  from scanformer_jax.predictor import read_image  # pylint: disable=g-import-not-at-top
  samples = []
  for name in sorted(os.listdir(folder)):
    if os.path.splitext(name)[1].lower() not in (".jpg", ".jpeg", ".png", ".webp"):
      continue
    png = io.BytesIO()
    Image.fromarray(read_image(os.path.join(folder, name), name)).save(png, format="PNG")
    samples.append({"name": name, "text": "", "png": png.getvalue()})
  if not samples:
    raise UserError(f"--samples {folder}: no .jpg / .png images in it")
  return samples


def make_server(predictor, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                samples: Optional[list[dict]] = None,
                max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
                max_batch: Optional[int] = None) -> ThreadingHTTPServer:
  """The server (not yet serving: call `serve_forever`); port 0 picks a free one.

  `server.state.batcher.close()` stops the batching worker after `shutdown()`.
  """
  try:
    server = ThreadingHTTPServer((host, port), Handler)
  except OSError as e:
    raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
  server.daemon_threads = True
  server.state = ServeState(predictor, synthetic_samples() if samples is None else samples,  # type: ignore[attr-defined]
                            int(max_upload_mb * 2**20),
                            max_batch or predictor.batch_size)
  return server
