"""The notebook sampling API: covariates in, brains out, independent of the batch."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

from brain_ldm_jax import api
from brain_ldm_jax import presets
from brain_ldm_jax.data import manifest
from brain_ldm_jax.data import nifti
from brain_ldm_jax.errors import ConfigError, DataError
from random_weights import random_params

NAMES = presets.COVARIATES
STATS = manifest.CovariateStats(NAMES, (45.0, 0.0, 10.0, 1000.0), (80.0, 1.0, 120.0, 1500.0))
COND = {"age": [50.0, 70.0, 79.0], "sex": [0, 1, 1], "ventricular_volume": [20.0, 60.0, 100.0],
        "brain_volume": [1400.0, 1200.0, 1100.0]}


@pytest.fixture(scope="module")
def run():
  config = presets.base_config("test")
  config.sampling.num_steps = 2
  config.sampling.eta = 0.5  # exercise the per-step noise too
  return api.Run(config=config, params=random_params(config), stats=STATS,
                 scale_factor=1.0,
                 affine=nifti.mni_affine(config.data.shape, config.data.spacing),
                 checkpoint="in-memory")


def test_covariate_matrix():
  matrix = api.covariate_matrix(COND, NAMES)
  assert matrix.shape == (3, 4) and matrix.dtype == np.float64
  np.testing.assert_array_equal(api.covariate_matrix(matrix, NAMES), matrix)
  with pytest.raises(DataError, match="missing: sex"):
    api.covariate_matrix({k: v for k, v in COND.items() if k != "sex"}, NAMES)
  with pytest.raises(DataError, match="unknown covariates height"):
    api.covariate_matrix(dict(COND, height=[1, 2, 3]), NAMES)
  with pytest.raises(DataError, match="equal-length"):
    api.covariate_matrix(dict(COND, age=[50.0]), NAMES)
  with pytest.raises(DataError, match="NaN"):
    api.covariate_matrix(dict(COND, age=[50.0, np.nan, 60.0]), NAMES)
  with pytest.raises(DataError, match=r"shape \(batch, 4\)"):
    api.covariate_matrix(np.zeros((2, 3)), NAMES)


def test_normalise_warns_when_extrapolating(caplog):
  with caplog.at_level(logging.WARNING):
    out = api.normalise_covariates(np.array([[90.0, 1, 20, 1200]]), STATS, NAMES)
  assert out.dtype == np.float32 and out[0, 0] > 1
  assert "age outside the training range" in caplog.text


def test_sampling_options(run):
  assert api.sampling_options(run) == dict(sampler="ddim", num_steps=2, eta=0.5,
                                           guidance_scale=1.0)
  assert api.sampling_options(run, sampler="dpmpp_2m", eta=0.0, num_steps=7)["num_steps"] == 7
  for kwargs, message in ((dict(sampler="euler"), "choose one of"),
                          (dict(num_steps=5000), r"num_steps=5000 must be in \[1, 1000\]"),
                          (dict(eta=2.0), r"eta=2.0 must be in \[0, 1\]"),
                          (dict(sampler="ddpm"), "only applies to the ddim")):
    with pytest.raises(ConfigError, match=message):
      api.sampling_options(run, **kwargs)


def test_samples_do_not_depend_on_the_batch(run):
  sample = api.make_sampler(run)
  key = jax.random.key(3)
  together = np.asarray(sample(run.params, key, COND))
  assert together.shape == (3, *run.config.data.shape)
  assert together.min() >= 0 and together.max() <= 1 and together.std() > 0
  assert not np.array_equal(together[1], together[2])
  # Sample 2 alone, with its index: the bitwise same brain (per-sample program).
  alone = np.asarray(sample(run.params, key, {k: v[2:] for k, v in COND.items()},
                            first_index=2))
  np.testing.assert_array_equal(alone[0], together[2])


def test_the_sampling_loop_prepares_kernels_once_and_the_decoder_does_not(run, monkeypatch):
  # Traced only: which convolutions ask for kernels prepared from the parameters alone
  # (ops.invariant_kernels), so that XLA hoists them out of the sampler's loop.
  from brain_ldm_jax.cpu import onednn  # pylint: disable=g-import-not-at-top
  asked = []
  plain_conv = onednn.conv

  def recording_conv(*args, prepare_kernel=False, **kwargs):
    asked.append(prepare_kernel)
    return plain_conv(*args, prepare_kernel=prepare_kernel, **kwargs)

  monkeypatch.setattr(onednn, "conv", recording_conv)
  images = api.images_fn(run, sampler="ddim", num_steps=2, eta=0.0, guidance_scale=1.0)
  cond = np.zeros((1, len(NAMES)), np.float32)
  jax.eval_shape(images, run.params, jax.random.key(0), cond, np.zeros((1,), np.int32))
  loop, decoder = asked[:asked.index(False)], asked[asked.index(False):]
  assert loop and all(loop), "the UNet in the sampling loop"
  assert decoder and not any(decoder), "the autoencoder's decoder, after the loop"
