"""Forward process and the denoising training objective (pure functions).

Equivalent to MONAI's `Scheduler.add_noise` / `get_velocity` and the MONAI LDM tutorial's
`F.mse_loss(model_output.float(), target.float())`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from brain_ldm_jax.diffusion.schedules import Schedule
from brain_ldm_jax.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: str) -> None:
  if prediction_type not in PREDICTION_TYPES:
    raise ConfigError(f"diffusion.prediction_type={prediction_type!r}: allowed one of "
                      f"{', '.join(PREDICTION_TYPES)}")


def _per_sample(values: jnp.ndarray, ndim: int) -> jnp.ndarray:
  # (B,) -> (B, 1, ..., 1) to broadcast against a (B, ...) batch.
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def q_sample(
    schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray
) -> jnp.ndarray:
  """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε, with t of shape (B,) (or a scalar for all)."""
  ac = _per_sample(schedule.alphas_cumprod[t], x0.ndim)
  x_t = jnp.sqrt(ac) * x0 + jnp.sqrt(1.0 - ac) * noise
  return x_t.astype(x0.dtype)


def training_target(
    schedule: Schedule, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray, prediction_type: str
) -> jnp.ndarray:
  """What the network should output at x_t: ε ("epsilon", the paper), x_0 ("sample"), or
  v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x_0 ("v_prediction", MONAI's `get_velocity`)."""
  check_prediction_type(prediction_type)
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "sample":
    return x0
  ac = _per_sample(schedule.alphas_cumprod[t], x0.ndim)
  return (jnp.sqrt(ac) * noise - jnp.sqrt(1.0 - ac) * x0).astype(x0.dtype)


def sample_timesteps(key: jax.Array, batch: int, num_train_timesteps: int) -> jnp.ndarray:
  """Uniform training timesteps in [0, T), int32 (batch,), as `torch.randint(0, T, (B,))`."""
  return jax.random.randint(key, (batch,), 0, num_train_timesteps, dtype=jnp.int32)


def diffusion_loss(model_output: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
  """Mean squared error over all elements, in float32 whatever the compute dtype."""
  diff = model_output.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(jnp.square(diff))


def denoising_loss(
    apply_fn: Callable[..., jnp.ndarray],
    params: Any,
    x0: jnp.ndarray,
    key: jax.Array,
    schedule: Schedule,
    prediction_type: str = "epsilon",
    **model_kwargs,
) -> jnp.ndarray:
  """The LDM training loss for one batch of clean latents: draw t and ε, noise, predict, MSE.

  Args:
    apply_fn: `apply_fn(params, x_t, t, **model_kwargs) -> model_output` with t int32 of shape (B,),
      e.g. `lambda p, x, t, **kw: unet.apply({"params": p}, x, t, **kw)`. Conditioning that the
      network sees (covariate channels, the context token) goes through `model_kwargs`; only the
      latent is noised.
    params: the network's parameters (differentiate with respect to this argument).
    x0: clean latents (B, ...).
    key: one key for this batch; split into the timestep and noise draws.
    schedule: the forward process.
    prediction_type: "epsilon" (paper), "v_prediction" or "sample".
    **model_kwargs: passed through to `apply_fn`.

  Returns:
    The scalar float32 loss.
  """
  t_key, noise_key = jax.random.split(key)
  t = sample_timesteps(t_key, x0.shape[0], schedule.num_train_timesteps)
  noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
  x_t = q_sample(schedule, x0, t, noise)
  target = training_target(schedule, x0, noise, t, prediction_type)
  return diffusion_loss(apply_fn(params, x_t, t, **model_kwargs), target)
