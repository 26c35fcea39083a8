"""Fréchet distance vs the scipy.linalg.sqrtm formula; FID of a set with itself."""

import numpy as np
import scipy.linalg

from brain_ldm_jax.metrics import fid as F


def _sqrtm_formula(mu1, s1, mu2, s2):
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  covmean = covmean.real
  d = mu1 - mu2
  return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_distance_matches_sqrtm():
  rng = np.random.default_rng(0)
  for dim in (3, 16, 64):
    a = rng.standard_normal((400, dim)) @ rng.standard_normal((dim, dim))
    b = rng.standard_normal((500, dim)) @ rng.standard_normal((dim, dim)) + 0.3
    mu1, s1 = F.feature_statistics(a)
    mu2, s2 = F.feature_statistics(b)
    want = _sqrtm_formula(mu1, s1, mu2, s2)
    got = F.frechet_distance(mu1, s1, mu2, s2)
    assert abs(got - want) <= 1e-6 * abs(want), (got, want)


def test_fid_of_set_with_itself_is_zero():
  rng = np.random.default_rng(1)
  f = rng.standard_normal((200, 32))
  res = F.fid_from_features(f, f, "test")
  assert abs(res.value) < 1e-8 and res.extractor == "test"
  # Fewer samples than features: singular covariance, still real and ~0.
  g = rng.standard_normal((20, 64))
  assert abs(F.fid_from_features(g, g, "test").value) < 1e-8
  assert F.fid_from_features(g, g + 1.0, "test").value > 63.9
