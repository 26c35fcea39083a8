"""DDIM inversion: exact where the math says so, the sampler's inverse, and the edit's timesteps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brain_ldm_jax.diffusion import inversion
from brain_ldm_jax.diffusion import samplers
from brain_ldm_jax.diffusion import timesteps
from brain_ldm_jax.diffusion import schedules
from brain_ldm_jax.errors import ConfigError

SCHEDULE = schedules.make_schedule("scaled_linear_beta", 1000, 0.0015, 0.0205)


def _x_free_eps(x, t):
  """An ε-model that depends on t but not on x: DDIM inversion is then exact."""
  phase = t.astype(jnp.float32) / 97.0
  grid = jnp.linspace(-1.0, 1.0, x[0].size).reshape(x.shape[1:])
  return jnp.broadcast_to(jnp.sin(phase + 3.0 * grid), x.shape)


@pytest.mark.parametrize("strength", [1.0, 0.4])
@pytest.mark.parametrize("spacing", ["leading", "monai"])
def test_round_trip_is_exact_for_an_x_independent_model(strength, spacing):
  x0 = jax.random.normal(jax.random.key(0), (2, 4, 5))
  opts = dict(num_steps=10, strength=strength, timestep_spacing=spacing)
  x_t = inversion.ddim_invert(_x_free_eps, x0, SCHEDULE, **opts)
  back = inversion.ddim_regenerate(_x_free_eps, x_t, SCHEDULE, **opts)
  assert float(jnp.max(jnp.abs(x_t - x0))) > 0.5  # it did move to a noisier state
  np.testing.assert_allclose(back, x0, atol=2e-5)


def test_inversion_pairs_each_step_with_the_samplers_timestep():
  # An inversion that evaluated the network at the state's own (lower) timestep would need the
  # sampler to do the same; with a t-dependent model the round trip then misses by O(1).
  x0 = jnp.ones((1, 3))
  x_t = inversion.ddim_invert(_x_free_eps, x0, SCHEDULE, num_steps=5)
  ts = timesteps.ddim_timesteps(1000, 5)
  shifted = lambda x, t: _x_free_eps(x, t - (ts[0] - ts[1]))
  wrong = inversion.ddim_regenerate(shifted, x_t, SCHEDULE, num_steps=5)
  assert float(jnp.max(jnp.abs(wrong - x0))) > 0.05


def _gaussian_eps(mu, sigma):
  """The exact ε-prediction for data N(mu, sigma²): the probability-flow ODE is then linear."""
  def eps(x, t):
    a = SCHEDULE.alphas_cumprod[t]
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * sigma**2 + 1 - a)
  return eps


def test_inversion_follows_the_ode_of_gaussian_data():
  mu, sigma = 0.7, 0.3
  x0 = mu + sigma * jax.random.normal(jax.random.key(1), (3, 8))
  eps = _gaussian_eps(mu, sigma)
  errors = []
  for n in (20, 200):
    x_t = inversion.ddim_invert(eps, x0, SCHEDULE, num_steps=n)
    a = SCHEDULE.alphas_cumprod[timesteps.ddim_timesteps(1000, n)[0]]
    exact = jnp.sqrt(a) * mu + jnp.sqrt(a * sigma**2 + 1 - a) * (x0 - mu) / sigma
    back = inversion.ddim_regenerate(eps, x_t, SCHEDULE, num_steps=n)
    errors.append((float(jnp.max(jnp.abs(x_t - exact))), float(jnp.max(jnp.abs(back - x0)))))
  (ode20, trip20), (ode200, trip200) = errors
  # |x_T| reaches ~2 here; the first-order scheme's error shrinks ~1/N (measured: 0.36 -> 0.047
  # at the noise end, 0.22 -> 0.024 back at x_0).
  assert ode200 < 0.06 and trip200 < 0.03
  assert ode200 < ode20 / 4 and trip200 < trip20 / 4


@pytest.mark.parametrize("spacing", ["leading", "monai"])
def test_regenerate_at_full_strength_is_the_ddim_sampler(spacing):
  x_T = jax.random.normal(jax.random.key(2), (2, 6))
  fn = lambda x, t: jnp.tanh(x) * (t.astype(jnp.float32) / 1000.0) + 0.1 * x
  opts = dict(num_steps=7, timestep_spacing=spacing)
  ours = jax.jit(lambda x: inversion.ddim_regenerate(fn, x, SCHEDULE, **opts))(x_T)
  theirs = jax.jit(lambda x: samplers.ddim_sample(fn, x, None, SCHEDULE, **opts))(x_T)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_edit_timesteps_and_strength():
  ts = timesteps.ddim_timesteps(1000, 50)
  np.testing.assert_array_equal(inversion.edit_timesteps(1000, 50), ts)
  np.testing.assert_array_equal(inversion.edit_timesteps(1000, 50, 0.5), ts[25:])
  assert inversion.edit_timesteps(1000, 50, 0.5)[0] == 480
  for bad in (0.0, -0.1, 1.5):
    with pytest.raises(ConfigError, match="strength"):
      inversion.num_edit_steps(50, bad)
  with pytest.raises(ConfigError, match="inverts no step"):
    inversion.num_edit_steps(4, 0.1)


def test_refuses_what_cannot_be_inverted():
  x = jnp.zeros((1, 2))
  with pytest.raises(ConfigError, match="clip_sample"):
    inversion.ddim_invert(_x_free_eps, x, SCHEDULE, num_steps=2, clip_sample=True)
  with pytest.raises(ConfigError, match="sample"):
    inversion.ddim_invert(_x_free_eps, x, SCHEDULE, num_steps=2, prediction_type="sample")
