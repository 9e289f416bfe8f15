"""`scanformer predict --workdir W --image IMG --text "..." [--out PNG]`.

Prints the referred object's box in original pixels as JSON (the last scale's box is
the answer; every scale's box and keep ratio are included). `--out` writes the image
with each scale's box drawn, coarse to fine.
"""

from __future__ import annotations

import argparse
import json
import os

from scanformer_jax.cli import common

# Box colours per scale, coarse to fine (the last one is the answer).
SCALE_COLOURS = ((66, 135, 245), (245, 176, 66), (60, 200, 90), (230, 60, 200), (240, 40, 40))


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="scanformer predict",
                                   description="Box of the object an expression refers to.")
  common.add_workdir_args(parser)
  parser.add_argument("--image", required=True, help="image file (any PIL format)")
  parser.add_argument("--text", required=True, help="the referring expression")
  parser.add_argument("--out", metavar="PNG", help="write the image with boxes drawn")
  parser.add_argument("--step", type=int, help="checkpoint step (default: newest)")
  return parser


def draw_boxes(image, boxes, path: str) -> None:
  """Draws per-scale boxes (original px, coarse to fine) on a uint8 image, saves PNG."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  img = Image.fromarray(image).convert("RGB")
  draw = ImageDraw.Draw(img)
  width = max(1, round(max(img.size) / 200))
  num = len(boxes)
  for s, box in enumerate(boxes):
    colour = SCALE_COLOURS[-1] if s == num - 1 else SCALE_COLOURS[s % (len(SCALE_COLOURS) - 1)]
    w = width * (2 if s == num - 1 else 1)
    draw.rectangle([float(v) for v in box], outline=colour, width=w)
    draw.text((float(box[0]) + 2, float(box[1]) + 1), f"s{s}", fill=colour)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img.save(path)


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  common.setup_logging(args.verbose)

  def body() -> int:
    config = common.resolve_config(args.config, args.workdir, args.overrides)
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from data_pipelines import processing, transforms  # pylint: disable=g-import-not-at-top
    from scanformer_jax import data_source, workdir  # pylint: disable=g-import-not-at-top
    from scanformer_jax.model import ScanFormer  # pylint: disable=g-import-not-at-top

    cfg = config.model
    # The inputs first: a bad image or sentence fails before the checkpoint is read.
    image = processing.load_image_file(args.image)
    tokenizer = data_source.load_tokenizer(config)
    batch, meta = processing.preprocess_single(image, args.text, tokenizer, cfg.image_size,
                                               cfg.max_text_len, source=args.image)
    run = workdir.load_for_inference(args.workdir, config, args.step)

    @jax.jit
    def forward(params, image, text_ids, text_mask):
      return ScanFormer(cfg).apply({"params": params}, image, text_ids, text_mask,
                                   mode="sparse")

    out = jax.device_get(forward(run.params, batch["image"], batch["text_ids"],
                                 batch["text_mask"]))
    boxes = np.asarray(out.boxes[0])  # [S, 4] normalized cx, cy, w, h
    row_meta = {k: v[0] for k, v in meta.items()}
    pixel_boxes = [transforms.box_to_original_pixels(b, row_meta) for b in boxes]  # x0y0x1y1
    keep = [float(np.mean(t[0])) for t in out.taken]
    result = {
        "text": args.text,
        "image": args.image,
        "image_size": [int(v) for v in image.shape[:2]],  # [height, width]
        "box": [round(float(v), 2) for v in pixel_boxes[-1]],  # x0, y0, x1, y1 px
        "boxes_per_scale": [[round(float(v), 2) for v in b] for b in pixel_boxes],
        "keep_ratio": keep,
        "checkpoint_step": run.step,
    }
    if out.pred_iou is not None:
      result["pred_iou"] = [float(v) for v in np.asarray(out.pred_iou[0])]
    if args.out:
      draw_boxes(image, pixel_boxes, args.out)
      result["out"] = args.out
    print(json.dumps(result))
    return 0

  return common.run("scanformer predict", body, args.verbose)
