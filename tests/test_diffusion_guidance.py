"""Classifier-free guidance: null covariates, condition dropout, one or two network calls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brain_ldm_jax import diffusion

B, C = 3, 4


def _cond():
  return jax.random.uniform(jax.random.key(0), (B, C))  # min-max scaled covariates


def _net(calls):
  def fn(x, t, cond):
    calls.append((x.shape[0], cond.shape[0]))
    return jnp.tanh(x) * (1.0 + cond.mean(axis=-1)[:, None, None]) + 0.001 * t
  return fn


def test_null_cond_is_outside_the_covariate_range():
  assert not 0.0 <= diffusion.NULL_COND <= 1.0
  null = diffusion.null_cond_like(_cond())
  assert null.shape == (B, C) and bool(jnp.all(null == diffusion.NULL_COND))


def test_drop_conditions():
  cond = jax.random.uniform(jax.random.key(1), (1000, C))
  key = jax.random.key(2)
  # Jitted with a traced probability (one compilation), as in a training step.
  drop = jax.jit(diffusion.drop_conditions)
  np.testing.assert_array_equal(drop(key, cond, 0.0), cond)
  assert bool(jnp.all(drop(key, cond, 1.0) == diffusion.NULL_COND))
  dropped = drop(key, cond, 0.2)
  is_null = jnp.all(dropped == diffusion.NULL_COND, axis=-1)
  kept = jnp.all(dropped == cond, axis=-1)
  assert bool(jnp.all(is_null | kept))  # a whole covariate vector is dropped, or none of it
  assert 0.15 < float(is_null.mean()) < 0.25


@pytest.mark.parametrize("scale", [1.0, 0.0])
def test_one_network_call_per_step_without_guidance(scale):
  calls = []
  cond = _cond()
  schedule = diffusion.make_schedule("scaled_linear_beta", 1000, 0.0015, 0.0205)
  fn = diffusion.guided(_net(calls), cond, scale)
  x_T = jax.random.normal(jax.random.key(3), (B, 4, 2))
  out = jax.jit(lambda x: diffusion.sample(fn, x, None, schedule, sampler="ddim",
                                           num_steps=5))(x_T)
  # The scan body is traced once: one call of batch B per step.
  assert calls == [(B, B)]
  want_cond = cond if scale == 1.0 else diffusion.null_cond_like(cond)
  want = diffusion.sample(lambda x, t: _net([])(x, t, want_cond), x_T, None, schedule,
                          sampler="ddim", num_steps=5)
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_guidance_combines_one_batched_call():
  calls = []
  cond = _cond()
  x = jax.random.normal(jax.random.key(4), (B, 4, 2))
  t = jnp.int32(500)
  out = diffusion.guided(_net(calls), cond, 3.0)(x, t)
  assert calls == [(2 * B, 2 * B)]
  with_cond = _net([])(x, t, cond)
  without = _net([])(x, t, diffusion.null_cond_like(cond))
  np.testing.assert_allclose(out, without + 3.0 * (with_cond - without), rtol=1e-6, atol=1e-6)
