"""`scanformer bench [--model tiny|vilt_b32] [--keep-ratio R] [--train] ... [--json PATH]`.

Times compiled sparse vs dense inference with random weights (scanformer_jax/bench.py
says how), or with `--train` one training step of each train path, and prints the
table; `--json` writes the full report.
"""

from __future__ import annotations

import argparse
import json
import os

from scanformer_jax import bench
from scanformer_jax.cli import common


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="scanformer bench",
                                   description="Time compiled sparse vs dense inference.")
  parser.add_argument("--model", choices=bench.MODELS, default="vilt_b32")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--keep-ratio", type=float, default=0.25,
                      help="fraction of each scale's patches taken at s >= 1, in (0, 1]")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per mode (median)")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed calls per mode after compiling (at least 1 is made)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--text-len", type=int, default=None,
                      help="text tokens per sample (default: the model's max_text_len)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default=None, help="write the report here")
  parser.add_argument("--train", action="store_true",
                      help="time one training step (forward, backward, update) of the "
                           "dense and the sparse train path instead of inference")
  common.add_verbose_arg(parser)
  args = parser.parse_args(argv)
  if not 0.0 < args.keep_ratio <= 1.0:
    parser.error("--keep-ratio must be in (0, 1]")
  if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
    parser.error("--batch-size and --steps must be >= 1, --warmup >= 0")
  return args


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  common.setup_logging(args.verbose)

  def body() -> int:
    run, format_report = ((bench.run_train, bench.format_train_report) if args.train
                          else (bench.run, bench.format_report))
    report = run(model=args.model, batch_size=args.batch_size, keep_ratio=args.keep_ratio,
                 steps=args.steps, warmup=args.warmup, dtype=args.dtype, seed=args.seed,
                 text_len=args.text_len)
    print(format_report(report))
    if args.json:
      directory = os.path.dirname(os.path.abspath(args.json))
      os.makedirs(directory, exist_ok=True)
      with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
      print(f"wrote {args.json}")
    return 0

  return common.run("scanformer bench", body, args.verbose)
