"""Discrete noise schedules, computed exactly as MONAI's `NoiseSchedules` compute them.

A schedule is a plain struct of arrays (a pytree), so it passes through `jax.jit` as an ordinary
argument. It is built once on the host in float32 numpy, following torch's float32 arithmetic
(`torch.linspace`'s two-sided formula, sequential `cumprod`), so that our betas and cumulative
alphas equal MONAI's to an ulp or two (torch's SIMD linspace path rounds a few entries
differently, and that path depends on the CPU's vector width, so bit equality is not portable).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from brain_ldm_jax.errors import ConfigError

SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")


class Schedule(NamedTuple):
  """The discrete forward process q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 − ᾱ_t) I), t = 0 … T − 1.

  Attributes:
    betas: (T,) float32, β_t.
    alphas: (T,) float32, α_t = 1 − β_t.
    alphas_cumprod: (T,) float32, ᾱ_t = ∏_{s ≤ t} α_s.
  """

  betas: jnp.ndarray
  alphas: jnp.ndarray
  alphas_cumprod: jnp.ndarray

  @property
  def num_train_timesteps(self) -> int:
    # A static shape, so it is a Python int even inside jit.
    return self.betas.shape[0]


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
  """`torch.linspace(start, end, steps, dtype=torch.float32)` in numpy (torch's scalar formula).

  torch computes the first half forward from `start` and the second half backward from `end`,
  in float32; numpy's float64 linspace rounds differently, which moves timesteps that land on
  .5 (e.g. MONAI's 15-step DDPM listing). After rounding to integers this equals torch 2.13 for
  every steps ≤ 2048 (checked, T ≤ 4000); as floats it may differ from torch's SIMD path by an ulp.
  """
  f32 = np.float32
  start, end = f32(start), f32(end)
  if steps == 1:
    return np.array([start], np.float32)
  step = f32((end - start) / f32(steps - 1))
  idx = np.arange(steps)
  forward = start + step * idx.astype(np.float32)
  backward = end - step * (steps - idx - 1).astype(np.float32)
  return np.where(idx < steps // 2, forward, backward).astype(np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
  # Sequential float32 product, the order torch.cumprod uses on CPU.
  return np.cumprod(x.astype(np.float32), dtype=np.float32)


def make_schedule(
    name: str,
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 2e-2,
    *,
    sigmoid_range: float = 6.0,
    cosine_s: float = 8e-3,
) -> Schedule:
  """Builds a named schedule as MONAI's `Scheduler(num_train_timesteps, schedule, ...)` does.

  Args:
    name: one of `SCHEDULES`. The paper: "scaled_linear_beta", 0.0015 → 0.0205, T = 1000.
    num_train_timesteps: T.
    beta_start: β_0 for the beta schedules (not used by "cosine", whose shape has no β range).
    beta_end: β_{T−1} for the beta schedules (not used by "cosine").
    sigmoid_range: MONAI's `sig_range` for "sigmoid_beta".
    cosine_s: the offset s of Nichol & Dhariwal's cosine schedule (MONAI's default 8e-3).

  Returns:
    A `Schedule` of float32 jnp arrays.
  """
  if num_train_timesteps < 1:
    raise ConfigError(f"diffusion.num_train_timesteps={num_train_timesteps}: allowed an integer "
                      ">= 1")
  t = num_train_timesteps
  if name == "linear_beta":
    betas = torch_linspace(beta_start, beta_end, t)
  elif name == "scaled_linear_beta":
    # MONAI takes the square roots in Python (float64), then a float32 linspace, then squares.
    betas = torch_linspace(beta_start**0.5, beta_end**0.5, t) ** 2
  elif name == "sigmoid_beta":
    x = torch_linspace(-sigmoid_range, sigmoid_range, t)
    sig = (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)
    betas = sig * np.float32(beta_end - beta_start) + np.float32(beta_start)
  elif name == "cosine":
    x = torch_linspace(0, t, t + 1)
    ac = np.cos(((x / np.float32(t)) + np.float32(cosine_s)) / np.float32(1 + cosine_s)
                * np.float32(np.pi) * np.float32(0.5)) ** 2
    ac = ac / ac[0]
    betas = np.clip(1.0 - ac[1:] / ac[:-1], 0.0, 0.999).astype(np.float32)
  else:
    raise ConfigError(f"diffusion.schedule={name!r}: allowed one of {', '.join(SCHEDULES)}")
  betas = betas.astype(np.float32)
  alphas = (np.float32(1.0) - betas).astype(np.float32)
  return Schedule(
      betas=jnp.asarray(betas),
      alphas=jnp.asarray(alphas),
      alphas_cumprod=jnp.asarray(_cumprod_f32(alphas)),
  )


def schedule_from_config(config) -> Schedule:
  """The schedule of a run from its `config.diffusion` section (see presets `_diffusion`)."""
  return make_schedule(
      config.schedule,
      config.num_train_timesteps,
      beta_start=config.beta_start,
      beta_end=config.beta_end,
  )


def log_snr(alphas_cumprod: jnp.ndarray) -> jnp.ndarray:
  """λ = log(α/σ) = ½ log(ᾱ / (1 − ᾱ)), the half log signal-to-noise ratio of DPM-Solver."""
  return 0.5 * (jnp.log(alphas_cumprod) - jnp.log1p(-alphas_cumprod))
