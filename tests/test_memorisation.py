"""Memorisation audit: known answers (an exact copy is flagged, independent noise is not)."""

import numpy as np
import pytest
from scipy import ndimage

from brain_ldm_jax import nn
from brain_ldm_jax import presets
from brain_ldm_jax.metrics import memorisation as M
from random_weights import random_params

SHAPE = (32, 32, 32)


def _subjects(n, seed):
  """Brain-like volumes: a shared bright ellipsoid with a dark core, plus individual smooth texture."""
  rng = np.random.default_rng(seed)
  g = np.indices(SHAPE) - 15.5
  head = ((g[0] / 12) ** 2 + (g[1] / 14) ** 2 + (g[2] / 11) ** 2) < 1
  core = ((g[0] / 4) ** 2 + (g[1] / 6) ** 2 + (g[2] / 4) ** 2) < 1
  out = []
  for _ in range(n):
    texture = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 2.0)
    v = head * (0.75 + 2.0 * texture) * (1 - 0.7 * core)
    out.append(np.clip(v, 0, 1).astype(np.float32))
  return np.stack(out)


@pytest.fixture(scope="module")
def features():
  config = presets.base_config("test")
  ae = nn.build_autoencoder(config.autoencoder)
  params = random_params(config)["autoencoder"]
  train, val = _subjects(6, 0), _subjects(4, 1)
  noise = np.random.default_rng(2).random((2,) + SHAPE).astype(np.float32)
  generated = np.concatenate([train[3:4], noise])
  f = lambda v: M.latent_features(ae, params, v, batch_size=4)
  return dict(train=train, val=val, generated=generated,
              f_train=f(train), f_val=f(val), f_gen=f(generated))


def test_pairwise_distances_known_values():
  q = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
  r = np.array([[0.0, 0.0], [2.0, 0.0]], np.float32)
  np.testing.assert_allclose(M.pairwise_distances(q, r, "l2"), [[5, np.sqrt(17)], [1, 1]],
                             rtol=1e-6)
  np.testing.assert_allclose(M.pairwise_distances(q, r[1:], "cosine"), [[0.4], [0.0]], atol=1e-6)


def test_copy_flagged_noise_not(features):
  f = features
  gen = M.find_neighbours(f["f_gen"], f["f_train"], f["generated"], f["train"])
  real = M.find_neighbours(f["f_val"], f["f_train"], f["val"], f["train"])
  report = M.audit(gen, real, percentile=1.0, train_ids=[f"sub-{i}" for i in range(6)])
  rows = report["samples"]
  # The copy: nearest training subject is the original under every criterion, distance ~0.
  assert rows[0]["nearest_l2"] == rows[0]["nearest_ssim"] == rows[0]["nearest_cosine"] == "sub-3"
  assert rows[0]["l2"] < 1e-2 * report["real_vs_real"]["l2"]["min"]
  assert rows[0]["ssim"] > 0.999
  assert rows[0]["flagged"] and set(rows[0]["flagged_by"]) == {"latent_l2", "ssim"}
  # Independent noise: farther than every real subject and dissimilar.
  assert not rows[1]["flagged"] and not rows[2]["flagged"]
  assert report["num_flagged"] == 1
  assert "P1" in report["rule"]


def test_ssim_shortlist_keeps_the_copy(features):
  f = features
  full = M.find_neighbours(f["f_gen"][:1], f["f_train"], f["generated"][:1], f["train"])
  short = M.find_neighbours(f["f_gen"][:1], f["f_train"], f["generated"][:1], f["train"],
                            ssim_candidates=2)
  assert full.ssim_index[0] == short.ssim_index[0] == 3
