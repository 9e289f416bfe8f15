"""uint8 images on the device: normalised inside the jitted step, as the host would.

A training batch may carry `image` as uint8 [B, R, R, 3] (the letterboxed content at
the top-left, anything outside it ignored) with `content_hw` int32 [B, 2] (content
height, width). That is 4x fewer bytes to move than float32; `normalized` turns it into
the contract's float32 image ((x / 255 - 0.5) / 0.5 in the host's exact arithmetic,
padding 0) inside the compiled program. A float32 image passes through unchanged.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.contract import PAD_VALUE, PIXEL_MEAN, PIXEL_STD

# The host's arithmetic (transforms.normalize_into), so the two agree bit for bit.
_SCALE = np.float32(1.0 / (255 * PIXEL_STD))
_SHIFT = np.float32(PIXEL_MEAN / PIXEL_STD)

CONTENT_KEY = "content_hw"


def normalize(image: jax.Array, content_hw: jax.Array) -> jax.Array:
  """uint8 [B, R, R, 3] + content [B, 2] -> normalized float32 [B, R, R, 3], padding 0."""
  b, r = image.shape[0], image.shape[1]
  chex.assert_shape(image, (b, r, r, 3))
  chex.assert_shape(content_hw, (b, 2))
  values = image.astype(jnp.float32) * _SCALE - _SHIFT  # [B, R, R, 3]
  rows = jnp.arange(r)[None, :, None] < content_hw[:, 0, None, None]  # [B, R, 1]
  cols = jnp.arange(r)[None, None, :] < content_hw[:, 1, None, None]  # [B, 1, R]
  inside = (rows & cols)[..., None]  # [B, R, R, 1]
  return jnp.where(inside, values, jnp.float32(PAD_VALUE))


def normalized(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """`batch` with a float32 image (uint8 ones normalized; the content key dropped)."""
  image = batch["image"]
  if image.dtype != jnp.uint8:
    return batch
  if CONTENT_KEY not in batch:
    raise ValueError(f"a uint8 image batch needs {CONTENT_KEY!r} (content height, width)")
  out = {k: v for k, v in batch.items() if k != CONTENT_KEY}
  out["image"] = normalize(image, batch[CONTENT_KEY])
  return out
