"""Image pyramid: coarser scales area-downsampled from the finest, inside jit."""

from __future__ import annotations

import chex
import jax


def area_downsample(image: jax.Array, size: int) -> jax.Array:
  """Mean over non-overlapping f x f blocks: [B, R, R, C] -> [B, size, size, C]."""
  b, r, _, c = image.shape
  if r % size:
    raise ValueError(f"cannot area-downsample {r} px to {size} px")
  f = r // size
  return image.reshape(b, size, f, size, f, c).mean(axis=(2, 4))


def build_pyramid(image: jax.Array, image_sizes: tuple[int, ...]) -> tuple[jax.Array, ...]:
  """Coarse-to-fine images, one per scale; the last is `image` itself."""
  finest = image_sizes[-1]
  chex.assert_shape(image, (None, finest, finest, 3))
  return tuple(image if size == finest else area_downsample(image, size)
               for size in image_sizes)
