"""Python inference on a trained run: `scanformer_jax.load(workdir)(image, text)`.

    predictor = scanformer_jax.load("runs/demo")
    result = predictor("photo.jpg", "the dog on the left")
    result.box  # (x0, y0, x1, y1) in the photo's pixels, upright frame
    results = predictor.predict_batch(images, texts)  # same results, batched

Images are read upright: EXIF orientation is applied (`data_pipelines/images.py`), so
boxes refer to the image as viewers show it (a phone photo's sensor frame is never
used). Expressions longer than `model.max_text_len` tokens are truncated with a
warning and `truncated=True` in the result. The forward is the sparse scan, jitted
once per batch-size bucket (`batch_buckets`: powers of two up to the batch size, and
the batch size): fewer queries than a batch are padded to the smallest bucket that
holds them, a longer stream runs full batches, so any mix of calls compiles at most
a handful of programs. Each batch size runs the plan `scanformer calibrate`
measured faster there (`capacity.plan_for`: the bucketed sparse scan or the dense
one, the same answer; sparse when none was measured). Between processes, jax's
persistent compilation cache keeps the compiled programs and `compile_cache` the
traced ones (a `jax.export` program per batch size), so a second start neither
traces nor compiles the model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image

from data_pipelines import images as images_lib, processing, transforms
from data_pipelines.bad_input import BadSample
from data_pipelines.errors import DataError
from scanformer_jax.errors import UserError

log = logging.getLogger(__name__)

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]
DEFAULT_BATCH_SIZE = 8


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One query's answer. Pixel boxes are (x0, y0, x1, y1) in the upright original."""

  text: str
  image_size: tuple[int, int]  # (height, width) of the upright image
  boxes: np.ndarray  # [S, 4] each scale's box in original px, coarse to fine
  keep_ratio: tuple[float, ...]  # [S] fraction of each scale's patches read
  taken: tuple[np.ndarray, ...]  # per scale [G_s * G_s] bool, the patches read
  frame_boxes: np.ndarray  # [S, 4] normalized (cx, cy, w, h) in the model's frame
  meta: dict[str, Any]  # the letterbox meta row (for `visualize.scan_picture`)
  truncated: bool  # the expression was longer than max_text_len tokens
  pred_iou: Optional[np.ndarray] = None  # [S] when the model has the IoU head
  words_read: Optional[int] = None  # of a truncated expression: leading words read

  def __repr__(self) -> str:
    box = ", ".join(f"{float(v):.1f}" for v in self.box)
    keep = ", ".join(f"{k:.2f}" for k in self.keep_ratio)
    extra = ", truncated=True" if self.truncated else ""
    if self.pred_iou is not None:
      extra += f", pred_iou={float(self.pred_iou[-1]):.2f}"
    return (f"Prediction(text={self.text!r}, box=({box}), image_size={self.image_size}, "
            f"keep_ratio=({keep}){extra})")

  @property
  def box(self) -> np.ndarray:
    """The answer: the finest scale's box, [4] original px."""
    return self.boxes[-1]

  def to_json(self) -> dict[str, Any]:
    """The JSON `scanformer predict` prints (plain lists and numbers)."""
    out = {
        "text": self.text,
        "image_size": [int(v) for v in self.image_size],
        "box": [round(float(v), 2) for v in self.box],
        "boxes_per_scale": [[round(float(v), 2) for v in b] for b in self.boxes],
        "keep_ratio": [float(k) for k in self.keep_ratio],
        "truncated": bool(self.truncated),
    }
    if self.pred_iou is not None:
      out["pred_iou"] = [float(v) for v in self.pred_iou]
    return out

  def scan_picture(self, image: np.ndarray) -> np.ndarray:
    """The scan picture (`visualize.scan_picture`) of this prediction on `image`."""
    from scanformer_jax.visualize.scan_picture import scan_picture  # pylint: disable=g-import-not-at-top
    return scan_picture(image, self.meta, self.frame_boxes, self.taken, self.text,
                        pred_iou=self.pred_iou, words_read=self.words_read)


def read_image(image: ImageInput, source: Optional[str] = None,
               max_bytes: Optional[int] = None) -> np.ndarray:
  """A path, PIL image or uint8 [H, W, 3] array -> upright uint8 [H, W, 3].

  Paths and PIL images get their EXIF orientation applied; an array is taken as
  already upright. A path must name a regular file of at most `max_bytes` (default
  `images.MAX_IMAGE_BYTES`). A bad image raises a one-line `DataError`.
  """
  if isinstance(image, (str, os.PathLike)):
    return processing.load_image_file(image, max_bytes)
  if isinstance(image, Image.Image):
    try:
      return np.asarray(images_lib.to_rgb(images_lib.open_image(image)), np.uint8)
    except BadSample as e:
      raise DataError(f"bad image {source or 'given'}: {e.detail}") from None
  arr = np.asarray(image)
  if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
    raise DataError(f"{source or 'image'}: expected a uint8 [H, W, 3] array, got "
                    f"{arr.dtype} {arr.shape}")
  return arr


def batch_buckets(batch_size: int) -> tuple[int, ...]:
  """The batch sizes a Predictor compiles: 1, 2, 4, ... below `batch_size`, and it."""
  sizes, b = [], 1
  while b < batch_size:
    sizes.append(b)
    b *= 2
  return tuple(sizes + [batch_size])


def bucket_for(n: int, batch_size: int) -> int:
  """The smallest bucket of `batch_size` holding `n` <= batch_size queries."""
  return next(b for b in batch_buckets(batch_size) if b >= n)


def check_text(text: str, source: Optional[str] = None) -> None:
  """A one-line DataError for a missing or empty expression, worded for the Python
  API or a JSONL line (`prepare` alone words it for `predict --text`)."""
  from data_pipelines import bad_input  # pylint: disable=g-import-not-at-top
  if not isinstance(text, str):
    raise DataError(f"{source or 'query'}: the expression must be a string, got "
                    f"{type(text).__name__}")
  try:
    bad_input.check_expression(text)
  except BadSample as e:
    raise DataError(f"{source or 'query'}: {e.detail}: give the words that name the "
                    "object, e.g. 'the red square on the left'") from None


@dataclasses.dataclass(frozen=True)
class Query:
  """One preprocessed query: a B=1 contract batch and its meta row."""
  text: str
  image_size: tuple[int, int]
  batch: dict[str, Any]


class Predictor:
  """A trained run ready to answer queries (see the module docstring).

  Holds the parameters (one device), the tokenizer and one program per batch-size
  bucket, each running the plan recorded for its batch size (`plan`).
  `trace_count` counts the programs built (traced, or read from the cache).
  """

  def __init__(self, run, tokenizer, batch_size: int = DEFAULT_BATCH_SIZE,
               calls: Optional[int] = None):
    from scanformer_jax import capacity  # pylint: disable=g-import-not-at-top
    self.run = run
    self.config = run.config
    self.cfg = run.config.model
    self.step = run.step
    self.tokenizer = tokenizer
    self.batch_size = batch_size
    self.plans = capacity.plans_of(run.config)
    self.calls = calls  # Forwards this process will run, when known (Plan.mode_for).
    self.trace_count = 0
    self._programs: dict[int, Any] = {}

  def mode(self, batch_size: int) -> str:
    """The scan run at `batch_size`: "sparse" or "dense" (`capacity.mode_for`)."""
    from scanformer_jax import capacity  # pylint: disable=g-import-not-at-top
    return capacity.mode_for(self.plans, batch_size, self.calls)[0]

  def describe_plan(self, batch_size: int) -> Optional[str]:
    """`plan: dense (bucketed sparse measured 26.6 ms vs dense 9.3 ms at batch 1)`, or
    None when no plan was measured."""
    from scanformer_jax import capacity  # pylint: disable=g-import-not-at-top
    return capacity.mode_for(self.plans, batch_size, self.calls)[1]

  def _forward(self, batch_size: int):
    """The program of `batch_size`: (params, image, text_ids, text_mask) -> outputs."""
    program = self._programs.get(batch_size)
    if program is None:
      program = self._programs[batch_size] = self._build(batch_size)
      self.trace_count += 1
    return program

  def _build(self, batch_size: int):
    """The jitted forward of `batch_size` in its plan's mode. With the cache on it runs
    a `jax.export` program, read from `compile_cache` when an earlier process stored
    it (no tracing), else traced, exported and stored; plain jit otherwise."""
    import jax  # pylint: disable=g-import-not-at-top
    from jax import export as jax_export  # pylint: disable=g-import-not-at-top
    from scanformer_jax import compile_cache, config_io, forward, workdir  # pylint: disable=g-import-not-at-top
    cfg, mode = self.cfg, self.mode(batch_size)

    def run_forward(params, image, text_ids, text_mask):
      rows = forward.rows(cfg, params, {"image": image, "text_ids": text_ids,
                                        "text_mask": text_mask}, mode, masks=True)
      out = {"boxes": rows["boxes"], "taken": rows["taken_masks"]}  # [B, S, 4]; [B, N_s]
      if rows.get("pred_iou") is not None:
        out["pred_iou"] = rows["pred_iou"]  # [B, S]
      return out

    leaves, treedef = jax.tree.flatten(self.run.params)
    r, length = cfg.image_size, cfg.max_text_len
    specs = ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
             jax.ShapeDtypeStruct((batch_size, r, r, 3), np.float32),
             jax.ShapeDtypeStruct((batch_size, length), np.int32),
             jax.ShapeDtypeStruct((batch_size, length), np.bool_))
    key = compile_cache.cache_key(
        "forward", {"model": config_io.model_config_to_dict(cfg), "mode": mode,
                    "batch": batch_size, "treedef": str(treedef),
                    "params": [(x.shape, str(x.dtype)) for x in specs[0]]},
        workdir.registry_objects(cfg))
    if key is None:  # The cache is off, or a registry entry has no source file.
      return jax.jit(run_forward)

    def on_leaves(params_leaves, image, text_ids, text_mask):
      return run_forward(jax.tree.unflatten(treedef, params_leaves), image, text_ids,
                         text_mask)

    exported = None
    blob = compile_cache.load_blob(key)
    if blob is not None:
      try:
        exported = jax_export.deserialize(bytearray(blob))
      except Exception as e:  # pylint: disable=broad-except  # A damaged entry: trace again.
        log.debug("cached program %s unreadable (%s): tracing", key, e)
    if exported is None:
      try:
        exported = jax_export.export(jax.jit(on_leaves))(*specs)
        blob = exported.serialize()
      except Exception as e:  # pylint: disable=broad-except  # Not exportable here: plain jit.
        log.debug("the %s forward does not export (%s): not cached", mode, e)
        return jax.jit(run_forward)
      compile_cache.store_blob(key, blob)
    call = jax.jit(exported.call)
    return lambda params, *inputs: call(jax.tree.leaves(params), *inputs)

  def prepare(self, image: ImageInput, text: str, source: Optional[str] = None) -> Query:
    """Reads and preprocesses one query; a bad image or empty text raises DataError."""
    if source is None and isinstance(image, (str, os.PathLike)):
      source = str(image)
    arr = read_image(image, source)
    cfg = self.cfg
    batch, _ = processing.preprocess_single(arr, text, self.tokenizer, cfg.image_size,
                                            cfg.max_text_len, source=source or "the image")
    return Query(text=text, image_size=(int(arr.shape[0]), int(arr.shape[1])), batch=batch)

  def predict_queries(self, queries: Sequence[Query], batch_size: Optional[int] = None
                      ) -> list[Prediction]:
    """Runs prepared queries in batches of `batch_size`.

    Fewer queries than a batch run at their bucket (`bucket_for`); the short last
    batch of a longer stream is padded to the full batch size, the program its other
    batches already compiled.
    """
    import jax  # pylint: disable=g-import-not-at-top
    b = batch_size or self.batch_size
    results: list[Prediction] = []
    for start in range(0, len(queries), b):
      chunk = list(queries[start:start + b])
      size = b if len(queries) > b else bucket_for(len(chunk), b)
      padded = chunk + [chunk[-1]] * (size - len(chunk))
      stacked = {k: np.concatenate([q.batch[k] for q in padded]).astype(dtype)
                 for k, dtype in (("image", np.float32), ("text_ids", np.int32),
                                  ("text_mask", np.bool_))}
      out = jax.device_get(self._forward(size)(self.run.params, stacked["image"],
                                               stacked["text_ids"], stacked["text_mask"]))
      for i, query in enumerate(chunk):
        results.append(self._prediction(query, out, i))
    return results

  def _prediction(self, query: Query, out: dict, i: int) -> Prediction:
    meta = {k: v[0] for k, v in query.batch["meta"].items()}
    frame_boxes = np.asarray(out["boxes"][i], np.float32)  # [S, 4]
    if not np.isfinite(frame_boxes).all():
      raise UserError("predict: the model gives non-finite boxes (a diverged checkpoint?); "
                      "use an earlier step (--step) or retrain with a lower "
                      "optim.learning_rate")
    taken = tuple(np.asarray(t[i]) > 0.5 for t in out["taken"])  # per scale [N_s]
    pred_iou = out.get("pred_iou")
    return Prediction(
        text=query.text, image_size=query.image_size,
        boxes=transforms.box_to_original_pixels(frame_boxes, meta),
        keep_ratio=tuple(float(t.mean()) for t in taken), taken=taken,
        frame_boxes=frame_boxes, meta=meta, truncated=bool(meta["truncated"]),
        pred_iou=None if pred_iou is None else np.asarray(pred_iou[i], np.float32),
        words_read=self._words_read(query.text) if meta["truncated"] else None)

  def _words_read(self, text: str) -> int:
    """How many leading words of `text` fit in max_text_len tokens (binary search)."""
    words, room = text.split(), self.cfg.max_text_len - 2
    lo, hi = 0, len(words)  # fits(lo) holds, fits(hi) may not
    while lo < hi:
      mid = (lo + hi + 1) // 2
      if len(self.tokenizer.wordpiece_ids(" ".join(words[:mid]))) <= room:
        lo = mid
      else:
        hi = mid - 1
    return lo

  def predict_batch(self, images: Sequence[ImageInput], texts: Sequence[str],
                    batch_size: Optional[int] = None) -> list[Prediction]:
    """One `Prediction` per (image, text), in order; batched, jitted once per bucket."""
    if len(images) != len(texts):
      raise ValueError(f"{len(images)} images but {len(texts)} texts")
    for n, text in enumerate(texts):
      check_text(text, f"texts[{n}]")
    return self.predict_queries([self.prepare(im, t) for im, t in zip(images, texts)],
                                batch_size)

  def __call__(self, image: ImageInput, text: str) -> Prediction:
    """One query (batch of one)."""
    check_text(text, "text")
    return self.predict_queries([self.prepare(image, text)], batch_size=1)[0]


def load(workdir: str | os.PathLike, step: Optional[int] = None,
         batch_size: int = DEFAULT_BATCH_SIZE, config=None, calls: Optional[int] = None):
  """A trained model, ready to answer: `load(path)(image, text) -> Prediction`.

  Args:
    workdir: a run directory (`scanformer train --workdir`; it may have been moved
      or copied: its vocab.txt and config.json are read from it), or a directory
      written by `scanformer export` (then an `ExportedPredictor`, same API).
    step: the checkpoint's training step; default the newest (run directories only).
    batch_size: queries per forward in `predict_batch` (default 8); shorter batches
      are padded to a power of two, so at most log2(batch_size) + 1 programs compile.
    config: an `ExperimentConfig` to use instead of `<workdir>/config.json` (the CLI
      passes its `--config` / `--set` one).
    calls: how many forwards this process will run, when known (`scanformer predict`
      of one image: 1). With few, the plan whose program is ready sooner can win over
      the one faster per forward (`capacity.Plan.mode_for`); None (default): the
      faster per forward, right for a long-lived process.

  Returns:
    a `Predictor`: `predictor(image, text)` for one query (image: a path, PIL image
    or uint8 [H, W, 3] array), `predictor.predict_batch(images, texts)` for many;
    each answer is a `Prediction` (`.box` in the image's pixels, `.to_json()`,
    `.scan_picture(image)`). Compiled programs are cached on disk between processes
    (`scanformer_jax/compile_cache.py`; `SCANFORMER_NO_CACHE=1` turns it off).
  """
  from scanformer_jax import compile_cache, data_source, export as export_lib, host_allocator, workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  compile_cache.enable()
  host_allocator.keep_freed_memory()
  path = os.fspath(workdir)
  if export_lib.is_export_dir(path):
    if step is not None or config is not None:
      raise UserError(f"{path} is an exported model: it has one checkpoint and config; "
                      "drop step / config")
    return export_lib.ExportedPredictor(path)
  if config is None and not os.path.isfile(workdir_lib.config_path(path)):
    raise UserError(f"{path}: neither a run directory (no config.json) nor an exported "
                    "model (no export.json)")
  run = workdir_lib.load_for_inference(path, config, step)
  return Predictor(run, data_source.load_tokenizer(run.config), batch_size, calls)
