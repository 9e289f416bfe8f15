"""How many of the patches a trained model selects lie entirely in letterbox padding.

Images are letterboxed top-left into the square frame (data_pipelines/transforms.py),
so a non-square image leaves whole rows or columns of patches that are padding only.
They are ordinary tokens: selectable at scales >= 1 and attended. This counts, for
images of the given aspect ratios (width:height), the patches that are padding only
and how many of them the sparse scan took, per scale, and the share of the scan's
image tokens (its compute at s >= 1 grows with them) they make up.

    python experiments/measure_padding.py --workdir W [--vocab V] [--num 64]
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from data_pipelines import processing, transforms
from scanformer_jax import config_io, data_source, workdir as workdir_lib
from scanformer_jax.model import ScanFormer


def padding_patches(width: int, height: int, frame: int, grid: int) -> np.ndarray:
  """[grid * grid] bool: patches of the letterboxed frame holding no image pixel."""
  geom = transforms.letterbox_geometry(width, height, frame)
  starts = np.arange(grid) * frame / grid  # first pixel of each patch row/column
  rows, cols = np.meshgrid(starts >= geom.out_h, starts >= geom.out_w, indexing="ij")
  return (rows | cols).reshape(-1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--vocab", help="vocab.txt (data.vocab_path override)")
  parser.add_argument("--num", type=int, default=64)
  parser.add_argument("--aspects", default="4:3,3:4,16:9,1:1")
  parser.add_argument("--text", default="the red circle")
  args = parser.parse_args()
  config = workdir_lib.load_config(args.workdir)
  if args.vocab:
    config = config_io.apply_overrides(config, [f"data.vocab_path={args.vocab}"])
  cfg = config.model
  run = workdir_lib.load_for_inference(args.workdir, config)
  tokenizer = data_source.load_tokenizer(config)
  forward = jax.jit(lambda p, *x: ScanFormer(cfg).apply({"params": p}, *x, mode="sparse"))
  rng = np.random.default_rng(0)
  aspects = [tuple(int(v) for v in a.split(":")) for a in args.aspects.split(",")]
  num_scales = cfg.num_scales
  padding, taken_padding, taken = (np.zeros(num_scales) for _ in range(3))
  patches = np.zeros(num_scales)
  for i in range(args.num):
    aw, ah = aspects[i % len(aspects)]
    base = 120
    width, height = base * aw // max(aw, ah), base * ah // max(aw, ah)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    batch, _ = processing.preprocess_single(image, args.text, tokenizer, cfg.image_size,
                                            cfg.max_text_len)
    out = jax.device_get(forward(run.params, batch["image"], batch["text_ids"],
                                 batch["text_mask"]))
    for s in range(num_scales):
      pad = padding_patches(width, height, cfg.image_size, cfg.grid_sizes[s])
      took = np.asarray(out.taken[s][0]) > 0
      patches[s] += pad.size
      padding[s] += pad.sum()
      taken[s] += took.sum()
      taken_padding[s] += (took & pad).sum()
  report = {
      "workdir": args.workdir, "step": run.step, "images": args.num, "aspects": args.aspects,
      "grid_sizes": list(cfg.grid_sizes),
      "padding_fraction_of_patches": (padding / patches).round(4).tolist(),
      "taken_fraction": (taken / patches).round(4).tolist(),
      "padding_fraction_of_taken": (taken_padding / np.maximum(taken, 1)).round(4).tolist(),
      "padding_taken_fraction_of_padding": (taken_padding / np.maximum(padding, 1)
                                            ).round(4).tolist(),
  }
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
