"""`scanformer convert-vilt --src HF_DIR|CKPT --out DIR [--vocab V] [--force]`.

Converts pretrained ViLT weights into ScanFormer's layout (scanformer_jax/convert_vilt.py).
"""

from __future__ import annotations

import argparse

from scanformer_jax.cli import common


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="scanformer convert-vilt",
      description="Convert pretrained ViLT weights (Hugging Face directory or original .ckpt) "
                  "into ScanFormer's layout (orbax params + config.json + vocab.txt).")
  parser.add_argument("--src", required=True,
                      help="HF ViLT directory (config.json + model.safetensors or "
                           "pytorch_model.bin) or an original ViLT .ckpt")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--vocab", help="vocab.txt to copy (default: the one next to --src)")
  parser.add_argument("--num-heads", type=int,
                      help="attention heads (original .ckpt without hyper-parameters only)")
  parser.add_argument("--force", action="store_true", help="overwrite an existing output")
  common.add_verbose_arg(parser)
  return parser.parse_args(argv)


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  common.setup_logging(args.verbose)

  def body() -> int:
    common.check_writable(args.out, "--out", directory=True)
    from scanformer_jax import convert_vilt  # pylint: disable=g-import-not-at-top
    print(convert_vilt.convert(args.src, args.out, vocab=args.vocab, num_heads=args.num_heads,
                               force=args.force))
    return 0

  return common.run("scanformer convert-vilt", body, args.verbose)
