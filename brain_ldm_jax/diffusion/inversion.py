"""DDIM inversion (Song et al. 2021, §4.3; Dhariwal & Nichol 2021, App. F) and counterfactual edits.

Deterministic DDIM (eta = 0) is a discretised ODE: each step moves the state from one noise level
to the next through the network's (x̂_0, ε̂). Run backwards along the same timestep list, it maps
a clean latent x_0 to the noise x_T from which the sampler regenerates it; sampling from that
noise under other covariates gives the same subject with those covariates changed.

A sampler step from timestep t (state level ᾱ_t) to the next timestep s evaluates the network at
(x_t, t). Its inverse, from s up to t, evaluates the network at (x_s, t): the same
timestep label, at the state it has (x_t is not known yet). Apart from that single substitution
each inverse step is the sampler step's exact algebraic inverse, so

  * a network whose output does not depend on x (only on t and the covariates) round-trips to
    float rounding at any step count, and
  * for a real network the round trip error is the change of ε̂ between x_s and x_t, O(1/N).

`strength` in (0, 1] inverts only the last round(strength · N) steps of the N-step list (from the
clean end up to an intermediate timestep) and samples down from there: a partial edit that keeps
more of the subject (SDEdit-style, but deterministic).

Everything here is deterministic (no noise, no PRNG keys) and pure: `jax.jit` of a caller compiles
the network once; each direction is one `lax.scan`.

Conventions as in `samplers`: `denoise_fn(x, t) -> model_output` with t a scalar int32 array; the
steps are `timesteps.ddim_transitions` (the timestep list and where each step goes) and the clean
end point ᾱ is 1 (or ᾱ_0 with `set_alpha_to_one=False`), so `ddim_regenerate` at strength 1 is
`samplers.ddim_sample` with eta = 0 step for step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from brain_ldm_jax.diffusion import samplers
from brain_ldm_jax.diffusion import timesteps
from brain_ldm_jax.diffusion.losses import check_prediction_type
from brain_ldm_jax.diffusion.schedules import Schedule
from brain_ldm_jax.errors import ConfigError

# The sampler's own step pieces, so that inversion and sampling can never drift apart.
_predict_x0_eps = samplers._predict_x0_eps  # pylint: disable=protected-access
_alpha_cumprod_at = samplers._alpha_cumprod_at  # pylint: disable=protected-access
_final_alpha_cumprod = samplers._final_alpha_cumprod  # pylint: disable=protected-access
_model_output = samplers._model_output  # pylint: disable=protected-access


def num_edit_steps(num_steps: int, strength: float) -> int:
  """How many of the N listed steps an edit of `strength` inverts and resamples (≥ 1)."""
  strength = float(strength)
  if not 0.0 < strength <= 1.0:
    raise ConfigError(f"strength={strength} must be in (0, 1]: the fraction of the {num_steps} "
                      "DDIM steps to invert (1: all the way to noise)")
  k = int(round(strength * num_steps))
  if k < 1:
    raise ConfigError(f"strength={strength} with {num_steps} steps inverts no step; use a "
                      f"strength of at least {0.5 / num_steps:.3g} or more steps")
  return k


def edit_timesteps(num_train_timesteps: int, num_steps: int, strength: float = 1.0,
                   timestep_spacing: str = "leading", steps_offset: int = 0) -> np.ndarray:
  """The descending timesteps an edit visits: the last round(strength · N) of the sampler's list.

  The first entry is the timestep the inversion reaches (the noisiest state of the edit).
  """
  return _chain(num_train_timesteps, num_steps, strength, timestep_spacing, steps_offset)[0]


def _check(prediction_type: str, clip_sample: bool) -> None:
  check_prediction_type(prediction_type)
  if prediction_type == "sample":
    raise ConfigError("DDIM inversion needs ε̂ at the clean end point (ᾱ = 1), which a "
                      "'sample'-predicting network does not define; use an epsilon or "
                      "v_prediction run")
  if clip_sample:
    raise ConfigError("DDIM inversion cannot undo clip_sample (clipping x̂_0 is not invertible); "
                      "it needs a run with diffusion.clip_sample=False")


def _move(model_output, x, ac_from, ac_to, prediction_type):
  """One deterministic DDIM move of state x from level ᾱ_from to ᾱ_to (either direction)."""
  x0, eps = _predict_x0_eps(model_output, x, ac_from, prediction_type)
  return jnp.sqrt(ac_to) * x0 + jnp.sqrt(1.0 - ac_to) * eps


def _chain(num_train_timesteps, num_steps, strength, timestep_spacing, steps_offset):
  """The sampler's (timesteps, where each step goes) for the edit's steps, high to low.

  A destination below 0 is the clean end point. Taken from `timesteps.ddim_transitions`, so every
  stepping rule the sampler has (MONAI's t -> t - T // N included) is inverted step for step.
  """
  ts, previous = timesteps.ddim_transitions(num_train_timesteps, num_steps, timestep_spacing,
                                           steps_offset)
  k = num_edit_steps(num_steps, strength)
  return ts[len(ts) - k:], previous[len(ts) - k:]


def ddim_invert(
    denoise_fn: samplers.DenoiseFn,
    x_0: jnp.ndarray,
    schedule: Schedule,
    *,
    num_steps: int,
    strength: float = 1.0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
) -> jnp.ndarray:
  """The noisy state that deterministic DDIM maps back to the clean `x_0`.

  Walks the sampler's timestep list upwards: from the clean end point to the last listed
  timestep, then to the one before, ... up to `edit_timesteps(...)[0]` (the first listed timestep
  when strength = 1). Deterministic: no PRNG keys.

  Args:
    denoise_fn: `(x, t) -> model_output`, as for the samplers (bind the subject's own covariates).
    x_0: (B, ...) clean latents.
    schedule: the training schedule.
    num_steps: N, the sampler's step count; the inversion uses the same timestep list.
    strength: fraction of the N steps to invert, in (0, 1].
    prediction_type: "epsilon" or "v_prediction".
    clip_sample: must be False (clipping is not invertible); accepted to pass a run's options.
    timestep_spacing, steps_offset, set_alpha_to_one: as `samplers.ddim_sample`.

  Returns:
    (B, ...) float32 state at timestep `edit_timesteps(...)[0]`.
  """
  _check(prediction_type, clip_sample)
  ts, previous = _chain(schedule.num_train_timesteps, num_steps, strength, timestep_spacing,
                        steps_offset)
  final = _final_alpha_cumprod(schedule, set_alpha_to_one)
  x = x_0.astype(jnp.promote_types(x_0.dtype, jnp.float32))

  def body(x, step):
    t, s = step  # the sampler's step t -> s, walked from s up to t
    ac_s = _alpha_cumprod_at(schedule, s, final)
    ac_t = schedule.alphas_cumprod[t]
    return _move(_model_output(denoise_fn, x, t), x, ac_s, ac_t, prediction_type), None

  x, _ = jax.lax.scan(body, x, (jnp.asarray(ts[::-1]), jnp.asarray(previous[::-1])))
  return x


def ddim_regenerate(
    denoise_fn: samplers.DenoiseFn,
    x_t: jnp.ndarray,
    schedule: Schedule,
    *,
    num_steps: int,
    strength: float = 1.0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
) -> jnp.ndarray:
  """Deterministic DDIM from the state `ddim_invert` returned (same options) to the clean end.

  At strength 1 this is `samplers.ddim_sample(..., eta=0)`; below 1 it starts at the
  intermediate timestep the inversion reached. Options as `ddim_invert`.
  """
  _check(prediction_type, clip_sample)
  ts, previous = _chain(schedule.num_train_timesteps, num_steps, strength, timestep_spacing,
                        steps_offset)
  final = _final_alpha_cumprod(schedule, set_alpha_to_one)
  x = x_t.astype(jnp.promote_types(x_t.dtype, jnp.float32))

  def body(x, step):
    t, s = step
    ac_t = schedule.alphas_cumprod[t]
    ac_s = _alpha_cumprod_at(schedule, s, final)
    return _move(_model_output(denoise_fn, x, t), x, ac_t, ac_s, prediction_type), None

  x, _ = jax.lax.scan(body, x, (jnp.asarray(ts), jnp.asarray(previous)))
  return x


def ddim_edit(
    denoise_from_fn: samplers.DenoiseFn,
    denoise_to_fn: samplers.DenoiseFn,
    x_0: jnp.ndarray,
    schedule: Schedule,
    **options,
) -> jnp.ndarray:
  """`x_0` inverted under `denoise_from_fn` (its own covariates), regenerated under
  `denoise_to_fn` (the new ones). Options (num_steps, strength, ...) as `ddim_invert`."""
  x_t = ddim_invert(denoise_from_fn, x_0, schedule, **options)
  return ddim_regenerate(denoise_to_fn, x_t, schedule, **options)


__all__ = ["ddim_edit", "ddim_invert", "ddim_regenerate", "edit_timesteps", "num_edit_steps"]
