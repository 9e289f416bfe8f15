"""ScanFormer in JAX/Flax: referring expression comprehension by iterative scanning."""

from scanformer_jax.config import ModelConfig
from scanformer_jax.model import ScanFormer, ScanFormerOutput

__all__ = ["ModelConfig", "ScanFormer", "ScanFormerOutput"]
