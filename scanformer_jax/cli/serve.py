"""`scanformer serve`: the web demo and JSON endpoint of a trained (or exported) model.

    scanformer serve --workdir W [--host 127.0.0.1] [--port 7860]
    curl -F image=@photo.jpg -F text="the red square" http://127.0.0.1:7860/predict

`scanformer_jax/serve/app.py` lists the routes and the answers to bad input.
"""

from __future__ import annotations

import argparse
import logging

from scanformer_jax import compile_cache
from scanformer_jax.cli import common, help_format

log = logging.getLogger("scanformer_jax.serve")


def _parser() -> argparse.ArgumentParser:
  from scanformer_jax.serve import app  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog="scanformer serve", epilog=compile_cache.HELP + ".",
      description="Web page and POST /predict JSON endpoint for a trained run "
      "(--workdir) or a `scanformer export` directory.",
      formatter_class=help_format.DefaultsFormatter)
  common.add_workdir_args(parser)
  parser.add_argument("--host", default="127.0.0.1",
                      help="address to listen on (0.0.0.0: every interface; put a "
                      "TLS proxy in front of it then)")
  parser.add_argument("--port", type=int, default=app.DEFAULT_PORT,
                      help="port to listen on (0: any free port)")
  parser.add_argument("--batch-size", type=int, default=8,
                      help="most concurrent requests answered by one forward")
  parser.add_argument("--max-upload-mb", type=float, default=app.DEFAULT_MAX_UPLOAD_MB,
                      help="larger uploads are refused with HTTP 413")
  parser.add_argument("--samples", metavar="DIR", default=None,
                      help="folder of sample images offered on the page (default: "
                      "three scenes of the synthetic generator)")
  parser.add_argument("--step", type=int, help="checkpoint step (default: newest)")
  parser.add_argument("--no-warmup", action="store_true",
                      help="serve at once; each batch size then compiles on first use")
  return parser


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  common.setup_logging(args.verbose)

  def body() -> int:
    from scanformer_jax import export as export_lib, predictor as predictor_lib  # pylint: disable=g-import-not-at-top
    from scanformer_jax.errors import UserError  # pylint: disable=g-import-not-at-top
    from scanformer_jax.serve import app  # pylint: disable=g-import-not-at-top
    if args.batch_size < 1:
      raise UserError(f"--batch-size {args.batch_size} must be >= 1")
    samples = app.folder_samples(args.samples) if args.samples else None
    if export_lib.is_export_dir(args.workdir):
      predictor = predictor_lib.load(args.workdir)
    else:
      config = common.resolve_config(args.config, args.workdir, args.overrides)
      predictor = predictor_lib.load(args.workdir, args.step, args.batch_size, config=config)
    if not args.no_warmup:
      sizes = app.warm_up(predictor, samples or app.synthetic_samples(1), args.batch_size)
      log.info("compiled batch sizes %s", sizes)
    server = app.make_server(predictor, args.host, args.port, samples=samples,
                             max_upload_mb=args.max_upload_mb, max_batch=args.batch_size)
    host, port = server.server_address[:2]
    log.info("serving checkpoint step %s on http://%s:%d/ (Ctrl-C stops)", predictor.step,
             host, port)
    try:
      server.serve_forever()
    finally:
      server.server_close()
      server.state.batcher.close()
    return 0

  return common.run("scanformer serve", body, args.verbose)
