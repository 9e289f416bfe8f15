"""Sparse vs dense wall-clock over several keep ratios (a sweep of `scanformer bench`).

  python experiments/bench_model.py --model tiny --keep-ratios 0.1,0.25,0.5,1.0 \\
      --batch-size 8 --steps 10 --json-dir runs/bench

Each ratio is one `scanformer_jax.bench.run` (its own compile); prints one summary
line per ratio and, with --json-dir, writes bench_<model>_keep<R>.json per ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from scanformer_jax import bench


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=bench.MODELS, default="tiny")
  parser.add_argument("--keep-ratios", default="0.1,0.25,0.5,1.0")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--json-dir", default=None)
  args = parser.parse_args(argv)
  print(f"{'keep':>6}{'dense ms':>11}{'sparse ms':>11}{'speedup':>9}{'FLOPs ratio':>13}"
        f"{'speedup/FLOPs':>15}")
  for ratio in (float(r) for r in args.keep_ratios.split(",")):
    report = bench.run(model=args.model, batch_size=args.batch_size, keep_ratio=ratio,
                       steps=args.steps, dtype=args.dtype)
    modes = report["modes"]
    print(f"{ratio:>6.2f}{modes['dense']['median_ms']:>11.1f}{modes['sparse']['median_ms']:>11.1f}"
          f"{report['speedup']:>8.2f}x{report['flops_ratio']:>12.2f}x"
          f"{report['speedup_over_flops_ratio']:>15.2f}", flush=True)
    if args.json_dir:
      os.makedirs(args.json_dir, exist_ok=True)
      path = os.path.join(args.json_dir, f"bench_{args.model}_keep{ratio:g}.json")
      with open(path, "w") as f:
        json.dump(report, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
