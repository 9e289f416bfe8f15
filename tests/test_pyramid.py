"""pyramid.py: area downsampling and the coarse-to-fine pyramid."""

import jax.numpy as jnp
import numpy as np
import pytest

from scanformer_jax.pyramid import area_downsample, build_pyramid


def test_area_downsample_averages_blocks():
  image = jnp.arange(16.0).reshape(1, 4, 4, 1) * jnp.array([1.0, -1.0, 2.0])  # [1, 4, 4, 3]
  out = area_downsample(image, 2)
  # Top-left 2x2 block of 0..15 row-major: 0, 1, 4, 5 -> 2.5.
  np.testing.assert_allclose(out[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])
  np.testing.assert_allclose(out[0, :, :, 2], 2 * np.array([[2.5, 4.5], [10.5, 12.5]]))
  np.testing.assert_allclose(area_downsample(image, 1)[0, 0, 0, 0], 7.5)


def test_build_pyramid_coarse_to_fine():
  image = jnp.asarray(np.random.RandomState(0).rand(2, 16, 16, 3), jnp.float32)
  pyramid = build_pyramid(image, (4, 8, 16))
  assert [p.shape for p in pyramid] == [(2, 4, 4, 3), (2, 8, 8, 3), (2, 16, 16, 3)]
  assert pyramid[-1] is image
  # Area downsampling composes: 16 -> 4 equals 16 -> 8 -> 4.
  np.testing.assert_allclose(pyramid[0], area_downsample(pyramid[1], 4), rtol=1e-6)
  np.testing.assert_allclose(pyramid[0].mean(), image.mean(), rtol=1e-5)


def test_pyramid_rejects_bad_sizes():
  with pytest.raises(ValueError):
    area_downsample(jnp.zeros((1, 10, 10, 3)), 4)
  with pytest.raises(AssertionError):  # chex: image is not the finest size
    build_pyramid(jnp.zeros((1, 8, 8, 3)), (4, 16))
