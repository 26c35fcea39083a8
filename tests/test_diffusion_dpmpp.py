"""DPM-Solver++(2M) against the exact probability-flow ODE of a Gaussian toy problem.

Data x_0 ~ N(μ, s²) per dimension. Then x_t ~ N(α_t μ, α_t² s² + σ_t²), the exact ε-prediction
is E[ε | x_t] = σ_t (x_t − α_t μ) / (α_t² s² + σ_t²), and the probability-flow ODE keeps the
standardised value z = (x_t − α_t μ) / sqrt(α_t² s² + σ_t²) constant: the ODE started at x at
timestep t_0 is at α μ + sqrt(α² s² + σ²) z at any later (α, σ).
"""

import jax
import jax.numpy as jnp
import pytest

from brain_ldm_jax import diffusion

T = 1000
MU = jnp.linspace(-1.0, 1.0, 8)
STD = jnp.linspace(0.5, 1.5, 8)  # latents are scaled to about unit std


@pytest.fixture(scope="module")
def schedule():
  return diffusion.make_schedule("scaled_linear_beta", T, 0.0015, 0.0205)  # the paper's


def _exact_denoiser(schedule, prediction_type):
  def fn(x, t):
    ac = schedule.alphas_cumprod[t]
    a, s = jnp.sqrt(ac), jnp.sqrt(1.0 - ac)
    var = ac * STD**2 + (1.0 - ac)
    eps = s * (x - a * MU) / var
    x0 = (x - s * eps) / a
    return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[prediction_type]
  return fn


def _exact_state(schedule, x, t0, alpha_cumprod_end):
  """Where the ODE started at x at timestep t0 is when ᾱ = alpha_cumprod_end."""
  ac = schedule.alphas_cumprod[t0]
  z = (x - jnp.sqrt(ac) * MU) / jnp.sqrt(ac * STD**2 + 1.0 - ac)
  ac = alpha_cumprod_end
  return jnp.sqrt(ac) * MU + jnp.sqrt(ac * STD**2 + 1.0 - ac) * z


def _run(schedule, sampler, num_steps, spacing=None, prediction_type="epsilon",
         set_alpha_to_one=False):
  """RMS error of the end point against the exact ODE solution, in units of the data's std."""
  x = jax.random.normal(jax.random.key(0), (256, 8))
  out = jax.jit(lambda x: diffusion.sample(
      _exact_denoiser(schedule, prediction_type), x, None, schedule, sampler=sampler,
      num_steps=num_steps, timestep_spacing=spacing, prediction_type=prediction_type,
      set_alpha_to_one=set_alpha_to_one))(x)
  ts = diffusion.ddim_timesteps(T, num_steps, spacing or "quadratic")
  # Without set_alpha_to_one the chain ends at timestep 0 (ᾱ_0): the pure ODE solve.
  end = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0]
  err = (out - _exact_state(schedule, x, int(ts[0]), end)) / STD
  return float(jnp.sqrt(jnp.mean(err**2)))


def test_dpmpp_2m_converges_to_the_exact_ode_solution(schedule):
  errors = {n: _run(schedule, "dpmpp_2m", n) for n in (10, 20, 40)}
  # DDIM is the first-order solver of the same ODE.
  ddim_20 = _run(schedule, "ddim", 20, "quadratic")
  assert errors[10] > errors[20] > errors[40], errors
  assert errors[20] < 0.015, errors  # ~1% of the data's std in 20 steps (0.008 measured)
  assert errors[20] < ddim_20 / 5, (errors, ddim_20)  # 0.069 measured
  # Second order: doubling the steps cuts the error by about four.
  assert errors[20] / errors[40] > 3.0, errors


def test_dpmpp_2m_clean_end_and_other_parametrisations(schedule):
  # The default end point ᾱ = 1: a last first-order step to the clean x̂_0, whose own error is the
  # gap between the posterior mean and the ODE's end from t = 0 (σ_0 ≈ 0.04): O(σ_0²/std²).
  assert _run(schedule, "dpmpp_2m", 20, set_alpha_to_one=True) < 0.015
  assert _run(schedule, "dpmpp_2m", 20, "quadratic", "v_prediction") < 0.015
  # Uniform timesteps work, but leave one big λ step at the end (see the sampler's docstring).
  assert _run(schedule, "dpmpp_2m", 20, "linspace", "sample") < 0.2
