"""Examples/s of the training input pipeline (decode, augment, letterbox, tokenize,
batch) on this machine, to check input never starves training.

  python experiments/bench_pipeline.py                      # 512 px, default workers
  python experiments/bench_pipeline.py --image-size 128 --num-workers 0 1 2

By default it builds (once) a synthetic set of 640 x 640 JPEG scenes, a little more
pixels than a COCO image (640 x 480), under --data-dir; pass --dataset to time a
built dataset instead (e.g. refcoco_unc with --tokenizer-path vocab.txt).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipelines import grain_ops, pipeline, synthetic_builder  # noqa: E402

BENCH_CONFIG = "train=1000,validation=8,test=8,size=640"


def bench(args: argparse.Namespace, workers: int | None) -> dict:
  it = pipeline.make_train_iter(
      args.dataset, "train", args.data_dir, image_size=args.image_size,
      max_text_len=40, global_batch_size=args.batch_size, seed=0, num_workers=workers,
      tokenizer_path=args.tokenizer_path, read_threads=args.read_threads)
  try:
    for _ in range(args.warmup):
      next(it)
    t0 = time.perf_counter()
    for _ in range(args.num_batches):
      next(it)
    dt = time.perf_counter() - t0
  finally:
    it.close()
  n = args.num_batches * args.batch_size
  used = grain_ops.default_num_workers() if workers is None else workers
  return {"image_size": args.image_size, "batch_size": args.batch_size,
          "num_workers": used, "default_workers": workers is None,
          "read_threads": args.read_threads or grain_ops.default_read_threads(),
          "examples_per_s": round(n / dt, 1), "s_per_batch": round(dt / args.num_batches, 4),
          "cpus": os.cpu_count(), "dataset": args.dataset}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data-dir", default="/tmp/scanformer_bench_data")
  p.add_argument("--dataset", default=None, help="default: a 640 px synthetic set")
  p.add_argument("--tokenizer-path", default=None)
  p.add_argument("--image-size", type=int, default=512)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--num-batches", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--num-workers", type=int, nargs="*", default=None,
                 help="worker counts to time (default: the pipeline default)")
  p.add_argument("--read-threads", type=int, default=None)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  if args.dataset is None:
    path = synthetic_builder.build(args.data_dir, BENCH_CONFIG)
    args.dataset = f"synthetic/{path.parent.name}"
  for w in (args.num_workers or [None]):
    print(json.dumps(bench(args, w)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
