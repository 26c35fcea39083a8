"""SSIM / MS-SSIM parity with MONAI's SSIMMetric / MultiScaleSSIMMetric, and pair sampling."""

import functools

import jax
import numpy as np
import pytest
from scipy import ndimage

from brain_ldm_jax.metrics import ssim as S
from conftest import import_reference


def _pair(shape, kind, seed):
  """Two channels-last volumes: iid uniform noise, or smooth structure + a distortion of it."""
  rng = np.random.default_rng(seed)
  if kind == "random":
    x, y = rng.random(shape), rng.random(shape)
  else:
    sp = (0,) + (2.5,) * (len(shape) - 2) + (0,)
    x = ndimage.gaussian_filter(rng.random(shape), sp)
    x = (x - x.min()) / (x.max() - x.min())
    grid = np.indices(shape[1:-1])
    ball = sum((g - n / 2) ** 2 for g, n in zip(grid, shape[1:-1])) < (min(shape[1:-1]) / 4) ** 2
    x = 0.6 * x + 0.4 * ball[None, ..., None]
    y = np.clip(ndimage.gaussian_filter(x, (0,) + (1,) * (len(shape) - 2) + (0,))
                + 0.05 * rng.standard_normal(shape), 0, 1)
  return x.astype(np.float32), y.astype(np.float32)


def _monai(metric_cls, x, y, **kw):
  torch = import_reference("torch")
  t = lambda a: torch.from_numpy(np.moveaxis(a, -1, 1).copy())
  return metric_cls(reduction="none", **kw)(t(x), t(y)).numpy().reshape(-1)


# Smallest sizes MONAI accepts: dim // (n-1)^2 > 10, i.e. 176 for 5 scales, 44 for 3.
CASES = [
    (2, (2, 176, 180, 2), S.MS_SSIM_WEIGHTS),
    (3, (2, 44, 48, 44, 1), (0.2, 0.5, 0.3)),
]


@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("spatial_dims,shape,weights", CASES)
def test_ssim_and_ms_ssim_match_monai(spatial_dims, shape, weights, kind):
  monai = import_reference("monai")
  x, y = _pair(shape, kind, seed=spatial_dims)
  want = _monai(monai.metrics.SSIMMetric, x, y, spatial_dims=spatial_dims)
  got = np.asarray(S.ssim(x, y, spatial_dims=spatial_dims))
  np.testing.assert_allclose(got, want, atol=1e-4)
  want = _monai(monai.metrics.MultiScaleSSIMMetric, x, y, spatial_dims=spatial_dims,
                weights=weights)
  got = np.asarray(S.ms_ssim(x, y, spatial_dims=spatial_dims, weights=weights))
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_ms_ssim_size_rules():
  assert S.max_ms_ssim_scales((40, 56, 40)) == 2
  assert S.max_ms_ssim_scales((160, 224, 160)) == 4
  assert S.max_ms_ssim_scales((176, 176)) == 5
  w = S.ms_ssim_weights_for((160, 224, 160))
  assert len(w) == 4 and abs(sum(w) - 1) < 1e-12
  with pytest.raises(ValueError, match="at most 2"):
    S.check_ms_ssim_size((40, 56, 40), 3)


def test_sample_pairs_distinct_and_valid():
  for n, m in [(5, 10), (50, 300), (300, 1000)]:
    p = S.sample_pairs(jax.random.key(n), n, m)
    assert p.shape == (m, 2)
    assert np.all(p[:, 0] < p[:, 1]) and p.min() >= 0 and p.max() < n
    assert len({tuple(r) for r in p}) == m
  with pytest.raises(ValueError, match="distinct pairs"):
    S.sample_pairs(jax.random.key(0), 4, 7)


def test_pairwise_diversity():
  rng = np.random.default_rng(0)
  vols = rng.random((6, 24, 24, 1)).astype(np.float32)
  metric = functools.partial(S.ssim, spatial_dims=2)
  key = jax.random.key(3)
  pairs = S.sample_pairs(key, 6, 7)
  want = np.mean([float(S.ssim(vols[i][None], vols[j][None], spatial_dims=2)[0]) for i, j in pairs])
  got = S.pairwise_diversity(vols, key, 7, metric, batch_size=3)  # 3 batches, last padded
  assert abs(got - want) < 1e-6
  same = S.pairwise_diversity(np.repeat(vols[:1], 4, axis=0), key, 3, metric, batch_size=3)
  assert abs(same - 1.0) < 1e-6
