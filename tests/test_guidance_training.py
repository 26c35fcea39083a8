"""Classifier-free guidance needs a run trained with condition dropout, and dropout reaches the UNet."""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
import pytest

from brain_ldm_jax import api
from brain_ldm_jax import networks
from brain_ldm_jax import presets
from brain_ldm_jax import run_dir
from brain_ldm_jax import sharding as sharding_lib
from brain_ldm_jax.data import manifest
from brain_ldm_jax.diffusion import guidance
from brain_ldm_jax.errors import ConfigError
from brain_ldm_jax.nn import unet as unet_lib
from brain_ldm_jax.train import ldm as ldm_stage

NAMES = presets.COVARIATES
STATS = manifest.CovariateStats(NAMES, (45.0, 0.0, 10.0, 1000.0), (80.0, 1.0, 120.0, 1500.0))


def _run(config) -> api.Run:
  """A run as `api.load_run` reads it back from run.json (no weights: only options are asked)."""
  info = json.loads(json.dumps(run_dir.run_info(config, STATS, 1.0, np.eye(4))))
  return api.Run(config=ml_collections.ConfigDict(info["config"]), params={}, stats=STATS,
                 scale_factor=1.0, affine=np.eye(4), checkpoint="in-memory")


def test_guidance_is_refused_for_a_run_trained_without_dropout():
  # The paper's model (and so a converted MONAI run) was trained without condition dropout.
  run = _run(presets.base_config("paper"))
  assert run.config.train_ldm.cond_drop_prob == 0
  for scale in (0.0, 3.0):
    with pytest.raises(ConfigError, match=r"sampling.guidance_scale=\d.*"
                                          r"train_ldm.cond_drop_prob=0\b"):
      api.sampling_options(run, guidance_scale=scale)
    with pytest.raises(ConfigError, match="no unconditional model"):
      api.make_sampler(run, guidance_scale=scale)
  assert api.sampling_options(run)["guidance_scale"] == 1.0


def test_guidance_is_refused_for_a_run_json_without_the_dropout_field():
  config = presets.base_config("test")
  del config.train_ldm["cond_drop_prob"]  # a run.json from before the field existed
  with pytest.raises(ConfigError, match="train_ldm.cond_drop_prob=0"):
    api.sampling_options(_run(config), guidance_scale=2.0)


def test_guidance_is_allowed_after_training_with_dropout():
  config = presets.base_config("test")
  config.train_ldm.cond_drop_prob = 0.1
  options = api.sampling_options(_run(config), guidance_scale=3.0)
  assert options["guidance_scale"] == 3.0


def test_training_steps_with_dropout_show_the_unet_the_null_condition(monkeypatch):
  config = presets.base_config("test")
  config.train_ldm.cond_drop_prob = 0.5
  config.unet.channels, config.unet.attention_levels = (8, 8), (False, True)
  config.unet.num_head_channels = (0, 8)
  seen = []  # the covariates each traced step hands the UNet, recorded when it runs
  plain = unet_lib.hybrid_conditioning

  def recording(z, cond):
    jax.debug.callback(lambda c: seen.append(np.asarray(c)), cond)
    return plain(z, cond)

  monkeypatch.setattr(unet_lib, "hybrid_conditioning", recording)
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
  built = ldm_stage.build(config, mesh, jax.random.key(0))
  state = built["init"]()
  batch_size = 8
  zshape = networks.latent_shape(config)
  rng = np.random.default_rng(0)
  cond = rng.uniform(0, 1, (batch_size, len(NAMES))).astype(np.float32)
  batch = {"latent_mean": rng.standard_normal((batch_size, *zshape)).astype(np.float32),
           "latent_logvar": np.zeros((batch_size, *zshape), np.float32), "cond": cond}
  losses = []
  for _ in range(3):
    state, metrics = built["step"](state, batch, None, np.float32(1.0))
    losses.append(float(metrics.compute()["loss"]))
  jax.block_until_ready(state)
  assert int(state.step) == 3 and np.all(np.isfinite(losses))
  steps_seen = [c for c in seen if c.shape[0] == batch_size]  # not the init's dummy input
  assert len(steps_seen) == 3
  dropped = []
  for step_cond in steps_seen:
    is_null = np.all(step_cond == guidance.NULL_COND, axis=1)
    # Every row is either the subject's own covariates or the null condition as a whole.
    np.testing.assert_array_equal(step_cond[~is_null], cond[~is_null])
    dropped.append(is_null)
  dropped = np.stack(dropped)
  assert 0 < dropped.mean() < 1, dropped  # both kinds of rows were trained on
  assert len({tuple(d) for d in dropped}) > 1, "each step draws its own dropout"
