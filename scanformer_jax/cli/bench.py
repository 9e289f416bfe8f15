"""`scanformer bench [--model tiny|vilt_b32] [--keep-ratio R] [--train [--memory | --loop --config C] | --latency | --throughput] ... [--json PATH]`.

Times compiled sparse vs dense inference with random weights (scanformer_jax/bench/
says how), or with `--train` one training step of each train path (`--train --memory`:
the step's per-device compiled bytes and saved residuals, `--set` overrides such as
model.dtype, model.remat, train.microbatches, train.path; `--train --loop --config C`:
the config's whole training loop against a baseline loop, scanformer_jax/bench/loop.py),
or with `--latency`
batch-1 p50/p90 latency of dense, fixed-capacity and bucketed sparse inference, or
with `--throughput --workdir W` a trained run's eval-batch samples/s, dense vs
sparse (scanformer_jax/bench_throughput.py), and prints the table; `--json` writes
the full report.
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
  parser.add_argument("--model", choices=bench.MODELS, default="vilt_b32",
                      help="model size with random weights (default: %(default)s)")
  parser.add_argument("--batch-size", type=int, default=8,
                      help="samples per call (default: %(default)s)")
  parser.add_argument("--keep-ratio", type=float, default=0.25,
                      help="fraction of each scale's patches taken at s >= 1, in (0, 1]")
  parser.add_argument("--steps", type=int, default=10,
                      help="timed steps per mode (median); with --throughput: passes per mode")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed calls per mode after compiling (at least 1 is made)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype (default: %(default)s)")
  parser.add_argument("--text-len", type=int, default=None,
                      help="text tokens per sample (default: the model's max_text_len)")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the random weights and inputs (default: %(default)s)")
  parser.add_argument("--json", default=None, metavar="PATH",
                      help="also write the full report as JSON here")
  parser.add_argument("--train", action="store_true",
                      help="time one training step (forward, backward, update) of the "
                           "dense and the sparse train path instead of inference")
  parser.add_argument("--memory", action="store_true",
                      help="with --train: per-device bytes of the compiled train step and "
                      "its saved residuals instead of timing (--batch-size is per device)")
  parser.add_argument("--loop", action="store_true",
                      help="with --train --config: the config's training loop (data, "
                      "transfer, step, hooks) against the baseline loop, paired passes")
  parser.add_argument("--config", default=None, metavar="PATH",
                      help="with --loop: the experiment config, e.g. "
                      "experiments/configs/synthetic_tiny.py")
  parser.add_argument("--baseline-set", dest="baseline", action="append", default=None,
                      metavar="KEY=VALUE",
                      help="with --loop: the overrides that make the baseline loop from "
                      "the config (repeatable; default: data.ready_rows=False)")
  parser.add_argument("--passes", type=int, default=5,
                      help="with --loop: paired passes of --steps steps (default: %(default)s)")
  parser.add_argument("--image-sizes", default=None,
                      help="with --memory: comma-separated scale sizes, e.g. 160,320,640")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE", nargs="+",
                      help="with --memory or --loop: config overrides, e.g. "
                      "model.dtype=bfloat16 model.remat=layer train.microbatches=2")
  _add_latency_args(parser)
  common.add_verbose_arg(parser)
  args = parser.parse_args(argv)
  if args.train + args.latency + args.throughput > 1:
    parser.error("--train, --latency and --throughput are separate benchmarks: pass one")
  if args.throughput and not args.workdir:
    parser.error("--throughput needs --workdir (a trained, calibrated run)")
  if not 0.0 < args.keep_ratio <= 1.0:
    parser.error("--keep-ratio must be in (0, 1]")
  if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
    parser.error("--batch-size and --steps must be >= 1, --warmup >= 0")
  args.overrides = [item for items in args.overrides for item in items]
  if args.memory and not args.train:
    parser.error("--memory measures the train step: pass --train --memory")
  if args.loop and not (args.train and args.config):
    parser.error("--loop times a config's training loop: pass --train --loop --config PATH")
  if args.loop and args.memory:
    parser.error("--loop and --memory are separate benchmarks: pass one")
  if (args.config or args.baseline) and not args.loop:
    parser.error("--config and --baseline-set go with --train --loop")
  if args.image_sizes and not args.memory:
    parser.error("--image-sizes goes with --train --memory")
  if args.overrides and not (args.memory or args.loop):
    parser.error("--set goes with --train --memory or --train --loop")
  if args.image_sizes:
    try:
      args.image_sizes = [int(x) for x in args.image_sizes.split(",")]
    except ValueError:
      parser.error(f"--image-sizes expects integers like 160,320,640, got {args.image_sizes!r}")
  return args


def _add_latency_args(parser: argparse.ArgumentParser) -> None:
  """`--latency [--workdir W] [--split S]`: batch-1 p50/p90, dense/fixed/bucketed."""
  parser.add_argument("--latency", action="store_true",
                      help="batch-1 latency (p50/p90 of --steps samples) of dense, "
                      "fixed-capacity and bucketed sparse inference")
  parser.add_argument("--throughput", action="store_true",
                      help="eval-batch samples/s of a trained run (--workdir): dense, "
                      "bucketed and grouped sparse, timed in alternating passes")
  parser.add_argument("--workdir", default=None,
                      help="with --latency: a trained (calibrated) run, for its own "
                      "selection and capacities on real samples (default: random "
                      "weights); with --throughput: the run (required)")
  parser.add_argument("--split", default=None,
                      help="with --workdir: samples from this split")


def _latency_report(args: argparse.Namespace) -> tuple[dict, str]:
  report = bench.run_latency(model=args.model, workdir=args.workdir, steps=args.steps,
                             warmup=args.warmup, keep_ratio=args.keep_ratio,
                             dtype=args.dtype, seed=args.seed, split=args.split)
  return report, bench.format_latency(report)


def _write_json(args: argparse.Namespace, report: dict) -> None:
  if args.json:
    directory = os.path.dirname(os.path.abspath(args.json))
    os.makedirs(directory, exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {args.json}")


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  common.setup_logging(args.verbose)

  def body() -> int:
    common.check_writable(args.json, "--json")
    if args.throughput:
      from scanformer_jax import bench_throughput  # pylint: disable=g-import-not-at-top
      report = bench_throughput.run_throughput(args.workdir, args.split, args.steps)
      print(bench_throughput.format_throughput(report))
      _write_json(args, report)
      return 0
    if args.latency:
      report, table = _latency_report(args)
      print(table)
      _write_json(args, report)
      return 0
    if args.loop:
      from scanformer_jax import config_io  # pylint: disable=g-import-not-at-top
      config = config_io.apply_overrides(config_io.load_config_file(args.config),
                                         args.overrides)
      baseline = (bench.loop.BASELINE_OVERRIDES if args.baseline is None
                  else tuple(args.baseline))
      report = bench.run_loop(config, baseline, steps=args.steps, passes=args.passes)
      report["config"] = os.path.abspath(args.config)
      print(bench.format_loop(report))
      _write_json(args, report)
      return 0
    if args.memory:
      report = bench.run_memory(model=args.model, batch_size=args.batch_size,
                                image_sizes=args.image_sizes, overrides=args.overrides,
                                keep_ratio=args.keep_ratio)
      print(bench.format_memory(report))
      _write_json(args, report)
      return 0
    run, format_report = ((bench.run_train, bench.format_train_report) if args.train
                          else (bench.run, bench.format_report))
    report = run(model=args.model, batch_size=args.batch_size, keep_ratio=args.keep_ratio,
                 steps=args.steps, warmup=args.warmup, dtype=args.dtype, seed=args.seed,
                 text_len=args.text_len)
    print(format_report(report))
    _write_json(args, report)
    return 0

  return common.run("scanformer bench", body, args.verbose)
