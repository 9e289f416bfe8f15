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
Each input line is `{"image": path, "text": ..., "id": optional}` (UTF-8, a leading
byte-order mark allowed; relative image paths are relative to the JSONL file). Each
output line answers the input line of the same position: `id` and `line` echoed,
then the keys above; a bad line (not UTF-8, invalid or non-standard JSON such as
NaN, missing, special or corrupt image, empty or invalid text) becomes
`{"id", "line", "error"}` and the run goes on. Lines are written (flushed) as each
batch finishes, so an interrupted run keeps what it did. `--out-dir` writes
`line_<n>.png` scan pictures. Boxes refer to the upright image (EXIF orientation
applied). Images are read from regular files of at most `--max-image-mb` MB
(default 64). Every output path is checked before the model loads, and `--output`
may not name the `--input` file (nor `--out` the `--image`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Optional

from data_pipelines import images
from scanformer_jax.cli import common
from scanformer_jax.errors import UserError

_BOM = b"\xef\xbb\xbf"


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
  parser.add_argument("--max-image-mb", type=float, default=images.MAX_IMAGE_BYTES / 2**20,
                      metavar="MB", help="largest image file read (default %(default)g)")
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


def _same_file(a: str, b: str) -> bool:
  """Whether paths `a` and `b` name one file (through symlinks, `..` or hard links)."""
  if os.path.realpath(a) == os.path.realpath(b):
    return True
  try:
    return os.path.samefile(a, b)
  except OSError:  # One of them does not exist (yet).
    return False


def _check_args(args) -> None:
  if args.batch_size is not None and args.batch_size < 1:
    raise UserError(f"--batch-size {args.batch_size} must be >= 1")
  if not (args.max_image_mb > 0 and math.isfinite(args.max_image_mb)):
    raise UserError(f"--max-image-mb {args.max_image_mb} must be a positive number")
  if args.input:
    if args.image or args.text or args.out:
      raise UserError("--input (batch mode) takes no --image / --text / --out; use "
                      "--out-dir for the scan pictures")
    if not args.output:
      raise UserError("--input needs --output PATH (the predictions JSONL)")
    if not os.path.exists(args.input):
      raise UserError(f"--input {args.input}: no such file")
    if not os.path.isfile(args.input):
      raise UserError(f"--input {args.input} is not a regular file: give the queries JSONL")
    if _same_file(args.output, args.input):
      raise UserError(f"--output {args.output} is the --input file: it would overwrite the "
                      "queries; write the predictions to another file")
    common.check_writable(args.output, "--output")
    common.check_writable(args.out_dir, "--out-dir", directory=True)
  else:
    if not (args.image and args.text is not None):
      raise UserError("give --image IMG --text \"...\" (one query) or --input queries.jsonl "
                      "--output preds.jsonl (batch mode)")
    if args.output or args.out_dir:
      raise UserError("--output / --out-dir are for batch mode (--input); one query "
                      "prints its JSON and writes its picture to --out")
    if args.out:
      check_picture_path(args.out)
      if _same_file(args.out, args.image):
        raise UserError(f"--out {args.out} is the --image file: it would overwrite the "
                        "photo; write the scan picture to another file")
      common.check_writable(args.out, "--out")


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


def _refuse_constant(name: str) -> Any:
  raise ValueError(f"invalid JSON: {name} is not a JSON number (write null or a string)")


def _finite_float(text: str) -> float:
  value = float(text)
  if not math.isfinite(value):  # 1e999: valid JSON, but echoed it would be Infinity
    raise ValueError(f"invalid JSON: the number {text} is out of range")
  return value


def parse_query_line(raw: bytes) -> dict:
  """One input line (bytes) -> its query object; ValueError saying what is wrong.

  Strictly UTF-8 (a bad byte is reported, not replaced: the expression would change)
  and standard JSON (NaN, Infinity and out-of-range numbers such as 1e999, which
  Python's json accepts, are refused: echoed, they would make the output invalid).
  """
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"the line is not UTF-8 text (byte 0x{raw[e.start]:02x} at position "
                     f"{e.start + 1}); save the file as UTF-8") from None
  try:
    item = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
  except json.JSONDecodeError as e:
    raise ValueError(f"invalid JSON: {e.msg} (column {e.colno})") from None
  except RecursionError:
    raise ValueError("invalid JSON: nested too deeply") from None
  if not isinstance(item, dict):
    raise ValueError(f"expected a JSON object, got {type(item).__name__}")
  return item


class _BatchRun:
  """Batch mode: reads queries, runs full batches, writes answers in input order."""

  def __init__(self, predictor, out_file, out_dir: Optional[str], base_dir: str,
               batch_size: int, bar, max_image_bytes: Optional[int] = None):
    self.predictor, self.out_file, self.out_dir = predictor, out_file, out_dir
    self.base_dir, self.batch_size, self.bar = base_dir, batch_size, bar
    self.max_image_bytes = max_image_bytes
    self.pending: list[dict] = []  # in input order: {"line", "id", and "error" or query}
    self.num_queries = 0
    self.predicted = self.errors = 0

  def add(self, n: int, raw_line: bytes) -> None:
    entry: dict[str, Any] = {"line": n, "id": None}
    try:
      item = parse_query_line(raw_line)
      entry["id"] = item.get("id")
      entry.update(self._prepare(item))
      self.num_queries += 1
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
    predictor_lib.check_text(text, '"text"')  # Worded for the JSONL line, not --text.
    full = path if os.path.isabs(path) else os.path.join(self.base_dir, path)
    image = predictor_lib.read_image(full, path, self.max_image_bytes)
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
                  batch_size: int, progress: bool = True,
                  max_image_bytes: Optional[int] = None) -> tuple[int, int]:
  """Batch mode (module docstring); returns (predicted, errors)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  with open(input_path, "rb") as f:
    data = f.read()
  if data.startswith(_BOM):
    data = data[len(_BOM):]
  # Lines end at \n, \r\n or \r only (not at the Unicode separators inside strings).
  lines = data.splitlines()
  while lines and not lines[-1].strip():  # a trailing newline is no query
    lines.pop()
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
  base_dir = os.path.dirname(os.path.abspath(input_path))
  with open(output_path, "w", encoding="utf-8") as out, \
      tqdm(total=len(lines), desc="predict", unit="query", disable=not progress) as bar:
    batch_run = _BatchRun(predictor, out, out_dir, base_dir, batch_size, bar,
                          max_image_bytes)
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
    max_bytes = int(args.max_image_mb * 2**20)
    image = None if args.input else predictor_lib.read_image(args.image, args.image,
                                                             max_bytes)
    # One image: one forward in this process, so the program's start counts too.
    predictor = predictor_lib.load(args.workdir, args.step, batch_size, config=config,
                                   calls=None if args.input else 1)
    plan = getattr(predictor, "describe_plan", lambda _: None)(1 if not args.input
                                                              else batch_size)
    if plan:  # The plan `calibrate` measured faster for this batch size (and start).
      print(plan, file=sys.stderr)
    if not args.input:
      print(json.dumps(predict_one(predictor, args, image)))
      return 0
    predicted, errors = predict_jsonl(predictor, args.input, args.output, args.out_dir,
                                      batch_size, progress=not args.no_progress,
                                      max_image_bytes=max_bytes)
    print(f"{predicted} predicted, {errors} errors", file=sys.stderr)
    return 0

  return common.run("scanformer predict", body, args.verbose)
