"""The 2-D sin-cos position table: geometry, and that ScanFormer starts from it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scanformer_jax import ModelConfig, ScanFormer
from scanformer_jax.layers import sincos_pos_grid


def test_sincos_rows_encode_row_and_column():
  grid, dim = 4, 16
  table = sincos_pos_grid(grid, dim)
  assert table.shape == (1 + grid * grid, dim)
  np.testing.assert_array_equal(table[0], 0.0)  # The [CLS] slot carries no position.
  cells = table[1:].reshape(grid, grid, dim)
  row_part, col_part = cells[..., :dim // 2], cells[..., dim // 2:]
  # Row channels depend on the row only, column channels on the column only.
  np.testing.assert_allclose(row_part, np.broadcast_to(row_part[:, :1], row_part.shape))
  np.testing.assert_allclose(col_part, np.broadcast_to(col_part[:1, :], col_part.shape))
  # Lowest frequency (omega = 1): sin(row), cos(row).
  np.testing.assert_allclose(row_part[:, 0, 0], np.sin(np.arange(grid)), atol=1e-6)
  np.testing.assert_allclose(row_part[:, 0, dim // 4], np.cos(np.arange(grid)), atol=1e-6)
  # Every patch position is distinct.
  flat = table[1:]
  dists = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
  assert np.all(dists[~np.eye(len(flat), dtype=bool)] > 1e-3)


def test_sincos_needs_dim_divisible_by_four():
  with pytest.raises(ValueError, match="% 4"):
    sincos_pos_grid(3, 6)


def test_scanformer_initialises_pos_embed_from_sincos():
  cfg = ModelConfig.tiny(pos_embed_init="sincos")
  variables = ScanFormer(cfg).init(
      jax.random.key(0), jnp.zeros((1, cfg.image_size, cfg.image_size, 3)),
      jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool), mode="dense")
  np.testing.assert_allclose(variables["params"]["backbone"]["pos_embed"],
                             sincos_pos_grid(cfg.pos_grid_size, cfg.hidden_size))


def test_unknown_pos_embed_init_is_refused():
  with pytest.raises(ValueError, match="pos_embed_init"):
    ModelConfig.tiny(pos_embed_init="learned")
