"""`scanformer data ...`: build and inspect datasets.

  synthetic --data-dir D [--config default|small|tiny|train=N,validation=N,test=N,size=S]
  refcoco   --manual-dir M --data-dir D [--configs refcoco_unc,refcocog_umd,...]
  refer     --refer-root R --dataset refclef --split-by berkeley --image-dir I --data-dir D
            [--overwrite]
  inspect   --dataset NAME --split S --data-dir D [--num N] [--json] [--out DIR]
  ready     --config CONFIG [--set KEY=VALUE] [--ready-dir D] [--time-batches N]

User errors print one line (no traceback) and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from data_pipelines.errors import DataError
from scanformer_jax.errors import UserError


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="scanformer data", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)

  s = sub.add_parser("synthetic", help="build the synthetic REC dataset (no download)")
  s.add_argument("--data-dir", required=True)
  s.add_argument("--config", default="default",
                 help="default | small | tiny | 'train=N,validation=N,test=N,size=S,seed=K'")

  r = sub.add_parser("refcoco", help="build catalog ref_coco configs (needs TensorFlow)")
  r.add_argument("--manual-dir", required=True,
                 help="folder with refcoco.json and coco_train2014/")
  r.add_argument("--data-dir", required=True)
  r.add_argument("--configs", default=None,
                 help="comma-separated (default: all five ref_coco configs)")

  f = sub.add_parser("refer", help="build a refer-layout dataset (no TensorFlow)")
  f.add_argument("--refer-root", required=True,
                 help="refer data dir holding <dataset>/refs(<split_by>).p, instances.json")
  f.add_argument("--dataset", required=True, help="refcoco | refcoco+ | refcocog | refclef")
  f.add_argument("--split-by", required=True, help="unc | google | umd | berkeley")
  f.add_argument("--image-dir", required=True, help="folder with the images (any depth)")
  f.add_argument("--data-dir", required=True)
  f.add_argument("--max-bad-fraction", type=float, default=0.01,
                 help="fail if more than this fraction of a split's images is "
                 "missing/unreadable, or of its boxes is bad")
  f.add_argument("--overwrite", action="store_true",
                 help="rebuild an existing build whose inputs changed (else refused)")

  i = sub.add_parser("inspect", help="print decoded samples (and draw them)")
  i.add_argument("--dataset", required=True,
                 help="synthetic[/config] | refcoco_unc ... | refer/<dataset>_<split_by>")
  i.add_argument("--split", required=True)
  i.add_argument("--data-dir", required=True)
  i.add_argument("--num", type=int, default=5)
  i.add_argument("--json", action="store_true", help="print a JSON list")
  i.add_argument("--out", default=None, help="also write PNGs with the box drawn here")
  i.add_argument("--image-size", type=int, default=512,
                 help="letterbox frame used for the round trip through the pipeline")

  y = sub.add_parser("ready", help="build a config's ready rows (data.ready_rows) now, "
                     "and optionally time them against the decoding pipeline")
  y.add_argument("--config", required=True, help="experiment config file (get_config())")
  y.add_argument("--set", dest="overrides", action="append", default=[],
                 metavar="KEY=VALUE", help="override a config field (repeatable)")
  y.add_argument("--ready-dir", default=None,
                 help="where the rows go (default: <data.data_dir>/ready, where training "
                 "looks for them)")
  y.add_argument("--time-batches", type=int, default=0, metavar="N",
                 help="then time N train batches of each pipeline: examples/s and "
                 "CPU s per batch, one JSON line each")
  return p


def _ready(args: argparse.Namespace) -> None:
  """Builds (or finds) the ready rows of the config's train split; times them."""
  import time
  from data_pipelines import pipeline
  from scanformer_jax import config_io
  if args.time_batches < 0:
    raise DataError("--time-batches must be >= 0")
  config = config_io.apply_overrides(config_io.load_config_file(args.config), args.overrides)
  data, model = config.data, config.model
  if data.augment:
    raise DataError(f"{args.config} trains with data.augment=True: ready rows are for "
                    "unaugmented training (--set data.augment=false)")
  data_dir = os.path.expanduser(data.data_dir)
  kwargs = dict(image_size=model.image_size, max_text_len=model.max_text_len,
                global_batch_size=config.train.batch_size, seed=data.seed,
                num_workers=data.worker_count, augment=None, uint8_images=True,
                max_bad_fraction=data.max_bad_fraction,
                tokenizer_path=os.path.expanduser(data.vocab_path) if data.vocab_path else None)
  t0 = time.perf_counter()
  ready = pipeline.make_train_iter(data.dataset, data.train_split, data_dir, ready_rows=True,
                                   ready_dir=args.ready_dir, **kwargs)
  print(f"ready rows of {data.dataset}:{data.train_split} at {model.image_size} px in "
        f"{args.ready_dir or os.path.join(data_dir, 'ready')} "
        f"({time.perf_counter() - t0:.1f} s)")
  if not data.ready_rows:
    print("train with --set data.ready_rows=true to read them")
  if args.time_batches:
    decoding = pipeline.make_train_iter(data.dataset, data.train_split, data_dir, **kwargs)
    for name, it in (("decoding", decoding), ("ready_rows", ready)):
      print(json.dumps({"pipeline": name, **_time_batches(it, args.time_batches,
                                                          kwargs["global_batch_size"])}),
            flush=True)
      it.close()


def _time_batches(it, num: int, batch_size: int, warmup: int = 3) -> dict:
  """examples/s (wall) and CPU seconds per batch (every thread of this process) of
  `num` batches after `warmup` ones."""
  import time
  for _ in range(warmup):
    next(it)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(num):
    next(it)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return {"batches": num, "batch_size": batch_size,
          "examples_per_s": round(num * batch_size / wall, 1),
          "cpu_s_per_batch": round(cpu / num, 5), "wall_s_per_batch": round(wall / num, 5)}


def _inspect(args: argparse.Namespace) -> list[dict]:
  """The first N good samples of the split in pipeline order (fixed)."""
  import numpy as np
  from data_pipelines import processing, sources, transforms
  if args.num < 1:
    raise DataError("--num must be >= 1")
  from scanformer_jax.cli import common
  common.check_writable(args.out, "--out", directory=True)
  src = sources.SampleSource(args.dataset, args.split, args.data_dir)
  proc = processing.SampleProcessor(args.image_size, 2, None, None)
  out, bad = [], 0
  for idx in range(len(src)):
    if len(out) == args.num:
      break
    raw = src[idx]
    row = proc(raw)
    if "bad" in row:
      bad += 1
      logging.warning("sample %d skipped: bad %s", idx, row["bad"])
      continue
    meta = row["meta"]
    # The box as the model sees it, mapped back: checks the letterbox round trip.
    box = transforms.box_to_original_pixels(row["box"], meta)
    item = {"expression": meta["expression"], "image_id": int(meta["image_id"]),
            "image_size": [int(v) for v in meta["orig_size"]],
            "box": [round(float(v), 2) for v in box]}
    out.append(item)
    if args.out:
      _draw(raw["image"], np.asarray(box), item, Path(args.out) / f"{len(out) - 1:04d}_{idx}.png")
  if bad:
    logging.warning("%s:%s: %d bad samples skipped among the first %d", args.dataset,
                    src.split, bad, len(out) + bad)
  return out


def _draw(image_bytes: bytes, box, item: dict, path: Path) -> None:
  from PIL import ImageDraw
  from data_pipelines import images
  img = images.to_rgb(images.open_image(image_bytes))
  d = ImageDraw.Draw(img)
  d.rectangle([float(v) for v in box], outline=(255, 0, 0), width=max(1, img.width // 200))
  d.text((3, 3), item["expression"][:80], fill=(255, 0, 0))
  path.parent.mkdir(parents=True, exist_ok=True)
  img.save(path)


def _run(args: argparse.Namespace) -> int:
  if args.cmd not in ("inspect", "ready"):  # The builds write into --data-dir.
    from scanformer_jax.cli import common
    common.check_writable(args.data_dir, "--data-dir", directory=True)
  if args.cmd == "synthetic":
    from data_pipelines import synthetic_builder
    path = synthetic_builder.build(args.data_dir, args.config)
    print(f"built synthetic dataset in {path}")
  elif args.cmd == "refcoco":
    from data_pipelines import refcoco_catalog
    configs = (tuple(c.strip() for c in args.configs.split(",") if c.strip())
               if args.configs else refcoco_catalog.CONFIGS)
    for path in refcoco_catalog.build(args.manual_dir, args.data_dir, configs):
      print(f"built {path}")
  elif args.cmd == "refer":
    from data_pipelines import refer_builder
    path = refer_builder.build(args.refer_root, args.dataset, args.split_by,
                               args.image_dir, args.data_dir, args.max_bad_fraction,
                               overwrite=args.overwrite)
    print(f"built {path}")
  elif args.cmd == "ready":
    _ready(args)
  elif args.cmd == "inspect":
    items = _inspect(args)
    if args.json:
      print(json.dumps(items, indent=1))
    else:
      for it in items:
        print(f"{it['image_id']:>10}  {it['image_size'][0]}x{it['image_size'][1]}  "
              f"box={it['box']}  {it['expression']!r}")
    if args.out:
      print(f"wrote {len(items)} images to {args.out}", file=sys.stderr)
  return 0


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  if not logging.getLogger().handlers:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  try:
    return _run(args)
  except UserError as e:  # DataError, or an unwritable output path
    print(f"scanformer data: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
