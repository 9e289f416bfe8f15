"""ScanFormer in JAX/Flax: referring expression comprehension by iterative scanning.

`scanformer_jax.load(workdir)` returns a `Predictor` for a trained run
(`scanformer_jax/predictor.py`); it is imported on first use, so `import
scanformer_jax` stays light.
"""

from scanformer_jax.config import ModelConfig
from scanformer_jax.model import ScanFormer, ScanFormerOutput

__all__ = ["ModelConfig", "ScanFormer", "ScanFormerOutput", "load"]


def load(workdir, step=None, **kwargs):
  """`predictor.load`: the Predictor of a trained run (see scanformer_jax/predictor.py)."""
  from scanformer_jax import predictor  # pylint: disable=g-import-not-at-top
  return predictor.load(workdir, step, **kwargs)
