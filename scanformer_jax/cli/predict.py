"""`scanformer predict`: the box of the object an expression refers to.

One query:
    scanformer predict --workdir W --image IMG --text "..." [--out scan.png]
prints the box in original pixels as JSON (the last scale's box is the answer; every
scale's box, keep ratio, `pred_iou` with the IoU head, and `truncated`). `--out`
writes the scan picture (`visualize.scan_picture`): the boxes per scale beside the
image rebuilt from the patches the model read.

Many queries, batched (jit-compiled once):
    scanformer predict --workdir W --input queries.jsonl --output preds.jsonl
        [--out-dir DIR] [--batch-size N]
Each input line is `{"image": path, "text": ..., "id": optional}` (relative image
paths are relative to the JSONL file). Each output line answers the input line of
the same position: `id` and `line` echoed, then the keys above; a bad line (invalid
JSON, missing or corrupt image, empty text) becomes `{"id", "line", "error"}` and
the run goes on. Lines are written (flushed) as each batch finishes, so an
interrupted run keeps what it did. `--out-dir` writes `line_<n>.png` scan pictures.
Boxes refer to the upright image (EXIF orientation applied).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional

from scanformer_jax.cli import common
from scanformer_jax.errors import UserError


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="scanformer predict",
                                   description="Box of the object an expression refers to.")
  common.add_workdir_args(parser)
  parser.add_argument("--image", help="image file (any PIL format)")
  parser.add_argument("--text", help="the referring expression")
  parser.add_argument("--out", metavar="PNG", help="write the scan picture here")
  parser.add_argument("--input", metavar="JSONL", help="queries, one JSON object a line")
  parser.add_argument("--output", metavar="JSONL", help="predictions, one line per query")
  parser.add_argument("--out-dir", metavar="DIR", help="batch mode: a scan picture per query")
  parser.add_argument("--batch-size", type=int, help="batch mode: queries per forward "
                      "(default: eval.batch_size)")
  parser.add_argument("--step", type=int, help="checkpoint step (default: newest)")
  parser.add_argument("--no-progress", action="store_true")
  return parser


def check_picture_path(path: str) -> None:
  """A UserError now (before inference) if PIL cannot write `path`'s extension."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.init()
  ext = os.path.splitext(path)[1].lower()
  fmt = Image.registered_extensions().get(ext)
  if fmt is None or fmt not in Image.SAVE:
    raise UserError(f"--out {path}: cannot write a {ext or 'extension-less'} image; use a "
                    ".png (or .jpg) file name")


def _check_args(args) -> None:
  if args.input:
    if args.image or args.text or args.out:
      raise UserError("--input (batch mode) takes no --image / --text / --out; use "
                      "--out-dir for the scan pictures")
    if not args.output:
      raise UserError("--input needs --output PATH (the predictions JSONL)")
    if not os.path.isfile(args.input):
      raise UserError(f"--input {args.input}: no such file")
    if args.batch_size is not None and args.batch_size < 1:
      raise UserError(f"--batch-size {args.batch_size} must be >= 1")
  else:
    if not (args.image and args.text is not None):
      raise UserError("give --image IMG --text \"...\" (one query) or --input queries.jsonl "
                      "--output preds.jsonl (batch mode)")
    if args.out:
      check_picture_path(args.out)


def _save_picture(prediction, image, path: str) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(prediction.scan_picture(image)).save(path)


def predict_one(predictor, args, image) -> dict[str, Any]:
  """One query: `image` is the already-read uint8 [H, W, 3] of `args.image`."""
  prediction = predictor.predict_queries(
      [predictor.prepare(image, args.text, source=args.image)], batch_size=1)[0]
  result = {"image": args.image, **prediction.to_json(), "checkpoint_step": predictor.step}
  if args.out:
    _save_picture(prediction, image, args.out)
    result["out"] = args.out
  return result


class _BatchRun:
  """Batch mode: reads queries, runs full batches, writes answers in input order."""

  def __init__(self, predictor, out_file, out_dir: Optional[str], base_dir: str,
               batch_size: int, bar):
    self.predictor, self.out_file, self.out_dir = predictor, out_file, out_dir
    self.base_dir, self.batch_size, self.bar = base_dir, batch_size, bar
    self.pending: list[dict] = []  # in input order: {"line", "id", and "error" or query}
    self.num_queries = 0
    self.predicted = self.errors = 0

  def add(self, n: int, text_line: str) -> None:
    entry: dict[str, Any] = {"line": n, "id": None}
    try:
      item = json.loads(text_line)
      if not isinstance(item, dict):
        raise ValueError(f"expected a JSON object, got {type(item).__name__}")
      entry["id"] = item.get("id")
      entry.update(self._prepare(item))
      self.num_queries += 1
    except json.JSONDecodeError as e:
      entry["error"] = f"invalid JSON: {e.msg} (column {e.colno})"
    except (ValueError, UserError) as e:  # UserError: DataError of a bad image / text
      entry["error"] = str(e)
    self.pending.append(entry)
    if self.num_queries == self.batch_size:
      self.flush()

  def _prepare(self, item: dict) -> dict:
    from scanformer_jax import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
    path, text = item.get("image"), item.get("text")
    if not isinstance(path, str) or not path:
      raise ValueError('missing "image" (an image file path)')
    if not isinstance(text, str):
      raise ValueError('missing "text" (the referring expression)')
    full = path if os.path.isabs(path) else os.path.join(self.base_dir, path)
    image = predictor_lib.read_image(full, path)
    query = self.predictor.prepare(image, text, source=path)
    return {"query": query, "image": path, "pixels": image if self.out_dir else None}

  def flush(self) -> None:
    """Runs the pending queries and writes every pending line, in order."""
    queries = [e["query"] for e in self.pending if "query" in e]
    predictions = iter(self.predictor.predict_queries(queries, self.batch_size)
                       if queries else [])
    for entry in self.pending:
      head = {"id": entry["id"], "line": entry["line"]}
      if "error" in entry:
        row = {**head, "error": entry["error"]}
        self.errors += 1
      else:
        prediction = next(predictions)
        row = {**head, "image": entry["image"], **prediction.to_json()}
        if self.out_dir:
          path = os.path.join(self.out_dir, f"line_{entry['line']:06d}.png")
          _save_picture(prediction, entry["pixels"], path)
          row["out"] = path
        self.predicted += 1
      self.out_file.write(json.dumps(row) + "\n")
      self.bar.update(1)
    self.out_file.flush()
    self.pending, self.num_queries = [], 0


def predict_jsonl(predictor, input_path: str, output_path: str, out_dir: Optional[str],
                  batch_size: int, progress: bool = True) -> tuple[int, int]:
  """Batch mode (module docstring); returns (predicted, errors)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  with open(input_path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  while lines and not lines[-1].strip():  # a trailing newline is no query
    lines.pop()
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
  base_dir = os.path.dirname(os.path.abspath(input_path))
  with open(output_path, "w", encoding="utf-8") as out, \
      tqdm(total=len(lines), desc="predict", unit="query", disable=not progress) as bar:
    batch_run = _BatchRun(predictor, out, out_dir, base_dir, batch_size, bar)
    for n, line in enumerate(lines, start=1):
      batch_run.add(n, line)
    batch_run.flush()
  return batch_run.predicted, batch_run.errors


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  common.setup_logging(args.verbose)

  def body() -> int:
    _check_args(args)
    config = common.resolve_config(args.config, args.workdir, args.overrides)
    from scanformer_jax import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
    batch_size = args.batch_size or config.eval.batch_size
    # The inputs first: a bad image fails before the checkpoint is read.
    image = None if args.input else predictor_lib.read_image(args.image, args.image)
    predictor = predictor_lib.load(args.workdir, args.step, batch_size, config=config)
    if not args.input:
      print(json.dumps(predict_one(predictor, args, image)))
      return 0
    predicted, errors = predict_jsonl(predictor, args.input, args.output, args.out_dir,
                                      batch_size, progress=not args.no_progress)
    print(f"{predicted} predicted, {errors} errors", file=sys.stderr)
    return 0

  return common.run("scanformer predict", body, args.verbose)
