"""ScanFormer in JAX/Flax: referring expression comprehension by iterative scanning.

`scanformer_jax.load(workdir)` returns a `Predictor` for a trained run
(`scanformer_jax/predictor.py`); it is imported on first use, so `import
scanformer_jax` stays light.
"""

from scanformer_jax.config import ModelConfig
from scanformer_jax.model import ScanFormer, ScanFormerOutput

__all__ = ["ModelConfig", "ScanFormer", "ScanFormerOutput", "load"]


def load(workdir, step=None, batch_size=8, config=None, calls=None):
  """A trained model, ready to answer: `load(path)(image, text) -> Prediction`.

      predictor = scanformer_jax.load("runs/demo")
      result = predictor("photo.jpg", "the dog on the left")
      result.box  # (x0, y0, x1, y1) in the photo's pixels
      results = predictor.predict_batch(images, texts)

  Args:
    workdir: a run directory (`scanformer train --workdir`, moved or copied is
      fine), or a directory written by `scanformer export`.
    step: the checkpoint's training step; default the newest.
    batch_size: queries per forward in `predict_batch` (default 8).
    config: an `ExperimentConfig` replacing `<workdir>/config.json`.
    calls: forwards this process will run, when known (a script answering one query:
      1): the plan whose program is ready sooner may then win. Default: unknown.

  Returns a `Predictor` (scanformer_jax/predictor.py, where `load` is documented in
  full). Compiled programs are cached on disk between processes;
  `SCANFORMER_NO_CACHE=1` turns that off.
  """
  from scanformer_jax import predictor  # pylint: disable=g-import-not-at-top
  return predictor.load(workdir, step, batch_size=batch_size, config=config, calls=calls)
