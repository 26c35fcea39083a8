"""4-G-R-SSIM known answers: identity, symmetry, and monotone drops with noise and blur."""

import numpy as np
from scipy import ndimage

from brain_ldm_jax.metrics.gr_ssim import four_g_r_ssim


def _volume(shape=(1, 30, 34, 30), seed=0):
  rng = np.random.default_rng(seed)
  x = ndimage.gaussian_filter(rng.random(shape), (0,) + (2,) * (len(shape) - 1))
  x = (x - x.min()) / (x.max() - x.min())
  g = np.indices(shape[1:])
  ball = sum((a - n / 2) ** 2 for a, n in zip(g, shape[1:])) < 81
  return (0.5 * x + 0.5 * ball[None]).astype(np.float32)


def test_four_g_r_ssim_known_answers():
  rng = np.random.default_rng(1)
  x = _volume()
  f = lambda a, b, sym=True: np.asarray(four_g_r_ssim(a, b, spatial_dims=3, symmetric=sym))
  np.testing.assert_allclose(f(x, x), 1.0, atol=1e-6)

  noisy = [np.clip(x + s * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
           for s in (0.02, 0.05, 0.1, 0.2)]
  blurred = [ndimage.gaussian_filter(x, (0, s, s, s)).astype(np.float32) for s in (0.7, 1.5, 3.0)]
  # One batched call per distortion family (one compilation per batch shape).
  sn = f(np.repeat(x, 4, 0), np.concatenate(noisy))
  sb = f(np.repeat(x, 3, 0), np.concatenate(blurred))
  assert np.all(sn < 1) and np.all(np.diff(sn) < 0), sn
  assert np.all(sb < 1) and np.all(np.diff(sb) < 0), sb

  # The symmetrised score is symmetric; the one-sided one is not in general (reference-based
  # thresholds), but averages to the symmetric one.
  a, b = np.concatenate([x, noisy[2]]), np.concatenate([noisy[3], blurred[1]])
  np.testing.assert_allclose(f(a, b), f(b, a), rtol=1e-6)
  ab, ba = f(a, b, False), f(b, a, False)
  np.testing.assert_allclose((ab + ba) / 2, f(a, b), rtol=1e-6)


def test_four_g_r_ssim_2d_channels_last():
  x = _volume((2, 40, 40))
  y = ndimage.gaussian_filter(x, (0, 1, 1)).astype(np.float32)
  s1 = np.asarray(four_g_r_ssim(x, y, spatial_dims=2))
  s2 = np.asarray(four_g_r_ssim(x[..., None], y[..., None], spatial_dims=2))
  np.testing.assert_allclose(s1, s2, rtol=1e-6)
  assert np.all((s1 > 0) & (s1 < 1))
