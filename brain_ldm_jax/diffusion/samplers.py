"""Samplers: DDPM, DDIM and DPM-Solver++(2M), each one `lax.scan` over its steps.

Every sampler is a pure function of `(denoise_fn, x_T, keys, schedule)` and hashable static
options, so `jax.jit` of a caller such as

    @jax.jit
    def generate(params, x_T, keys, cond):
      fn = lambda x, t: unet.apply({"params": params}, x, jnp.full(x.shape[:1], t), cond)
      return sample(fn, x_T, keys, schedule, sampler="ddim", num_steps=50)

compiles the network once and runs all steps on the device, with no host round trips.

Conventions:
  * `denoise_fn(x, t) -> model_output`: x is the (B, ...) float32 state, t a scalar int32 array,
    the same timestep for the whole batch (the caller broadcasts it if the network wants (B,)).
  * `keys`: (B,) PRNG keys, one per sample. The noise that step j adds to sample b is
    `jax.random.normal(jax.random.fold_in(keys[b], j), x_T.shape[1:])`, so samples never depend
    on the batch size or on how the batch is split over devices. Deterministic samplers
    (DDIM with eta = 0, DPM-Solver++) never touch the keys; they may be None.
  * Timesteps run from high to low; each step goes from `timesteps[j]` to `timesteps[j + 1]`
    (the next listed timestep, i.e. the math), and the last step goes to the clean end point
    ᾱ = 1 (or ᾱ_0 when `set_alpha_to_one=False`, as MONAI's DDIM option). The one exception is
    DDIM's "monai" rule (`ddim_transitions`), which reproduces MONAI 1.6's `DDIMScheduler`.
  * The state is carried in float32 whatever x_T's dtype: a bf16 state would lose the small
    per-step updates of a 1000-step chain.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from brain_ldm_jax.diffusion.losses import check_prediction_type
from brain_ldm_jax.errors import ConfigError
from brain_ldm_jax.diffusion.schedules import Schedule, log_snr
from brain_ldm_jax.diffusion.timesteps import ddim_timesteps, ddim_transitions, no_monai_rule

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
VARIANCE_TYPES = ("fixed_small", "fixed_large")

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def step_noise(keys: jax.Array, step: jnp.ndarray, shape, dtype=jnp.float32) -> jnp.ndarray:
  """The noise of step `step` for each sample: normal(fold_in(keys[b], step), shape)."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape, dtype))(keys)


def _steps(ts: np.ndarray, previous: Optional[np.ndarray] = None):
  """Scan inputs: step index, current timestep, where the step goes (< 0: the clean end point).

  `previous` defaults to the next listed timestep (see `ddim_transitions`).
  """
  if previous is None:
    previous = np.append(ts[1:], -1)
  return (jnp.arange(len(ts), dtype=jnp.int32), jnp.asarray(ts),
          jnp.asarray(previous.astype(np.int32)))


def _alpha_cumprod_at(schedule: Schedule, t: jnp.ndarray, final: jnp.ndarray) -> jnp.ndarray:
  """ᾱ_t, with t = −1 meaning the end point of the chain, whose ᾱ is `final`."""
  return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], final)


def _final_alpha_cumprod(schedule: Schedule, set_alpha_to_one: bool) -> jnp.ndarray:
  # MONAI DDIM: ᾱ after the last step is 1 (a clean sample) or ᾱ_0 ("as stable diffusion").
  return jnp.float32(1.0) if set_alpha_to_one else schedule.alphas_cumprod[0]


def _predict_x0_eps(model_output, x, alpha_cumprod_t, prediction_type):
  """(x̂_0, ε̂) from the network output, as MONAI's DDIM step (before any clipping)."""
  sqrt_a, sqrt_b = jnp.sqrt(alpha_cumprod_t), jnp.sqrt(1.0 - alpha_cumprod_t)
  if prediction_type == "epsilon":
    return (x - sqrt_b * model_output) / sqrt_a, model_output
  if prediction_type == "sample":
    return model_output, (x - sqrt_a * model_output) / sqrt_b
  # v_prediction
  return sqrt_a * x - sqrt_b * model_output, sqrt_a * model_output + sqrt_b * x


def _prepare(x_T, keys, needs_keys: bool, sampler: str):
  if needs_keys:
    if keys is None:
      raise ValueError(f"{sampler} adds noise: pass one PRNG key per sample (keys of shape (B,)).")
    if jax.tree_util.tree_leaves(keys)[0].shape[0] != x_T.shape[0]:
      raise ValueError(f"keys must hold one key per sample: got {keys.shape} for a batch of "
                       f"{x_T.shape[0]}.")
  return x_T.astype(jnp.promote_types(x_T.dtype, jnp.float32))


def _model_output(denoise_fn, x, t):
  return denoise_fn(x, t).astype(x.dtype)


def ddpm_sample(
    denoise_fn: DenoiseFn,
    x_T: jnp.ndarray,
    keys: jax.Array,
    schedule: Schedule,
    *,
    num_steps: Optional[int] = None,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: tuple[float, float] = (-1.0, 1.0),
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    variance_type: str = "fixed_small",
) -> jnp.ndarray:
  """Ancestral sampling as MONAI's `DDPMScheduler.step` (Ho et al. 2020, eq. 6–7).

  With all T steps (the default) this is MONAI's DDPM step for step. With fewer steps the
  posterior q(x_s | x_t, x̂_0) of the actual jump t → s is used (β_eff = 1 − ᾱ_t / ᾱ_s): MONAI's
  step always uses the single-step coefficients of t → t − 1 even after `set_timesteps(N < T)`,
  which does not sample the model's distribution. No noise is added on the step from t = 0.

  Args:
    denoise_fn: `(x, t) -> model_output`, see the module docstring.
    x_T: (B, ...) initial Gaussian noise.
    keys: (B,) PRNG keys, one per sample.
    schedule: the training schedule.
    num_steps: N ≤ T; None: T.
    prediction_type: what the network predicts: "epsilon", "sample" or "v_prediction".
    clip_sample: clip x̂_0 to `clip_sample_range` (MONAI's `clip_sample`; its constructor
      defaults to True, the paper's model uses False).
    clip_sample_range: (min, max) for `clip_sample`.
    timestep_spacing: see `ddim_timesteps`; MONAI's DDPM `set_timesteps` rule is "linspace".
    steps_offset: see `ddim_timesteps`.
    variance_type: "fixed_small" (MONAI's default, the posterior variance β̃, floored at 1e-20)
      or "fixed_large" (β).

  Returns:
    (B, ...) float32 samples.
  """
  check_prediction_type(prediction_type)
  if variance_type not in VARIANCE_TYPES:
    raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}.")
  no_monai_rule(timestep_spacing, "ddpm")
  T = schedule.num_train_timesteps
  ts = ddim_timesteps(T, T if num_steps is None else num_steps, timestep_spacing, steps_offset)
  x = _prepare(x_T, keys, True, "ddpm")
  one = jnp.float32(1.0)

  def body(x, step):
    j, t, s = step
    ac_t = schedule.alphas_cumprod[t]
    ac_s = _alpha_cumprod_at(schedule, s, one)
    # A one-step jump uses the schedule's own α_t and β_t (as MONAI): 1 − ᾱ_t/ᾱ_{t−1} in float32
    # would lose ~4 digits of the small early betas.
    single = s == t - 1
    alpha = jnp.where(single, schedule.alphas[t], ac_t / ac_s)
    beta = jnp.where(single, schedule.betas[t], 1.0 - alpha)
    x0, _ = _predict_x0_eps(_model_output(denoise_fn, x, t), x, ac_t, prediction_type)
    if clip_sample:
      x0 = jnp.clip(x0, *clip_sample_range)
    mean = (jnp.sqrt(ac_s) * beta / (1.0 - ac_t)) * x0 + (jnp.sqrt(alpha) * (1.0 - ac_s)
                                                          / (1.0 - ac_t)) * x
    if variance_type == "fixed_small":
      var = jnp.maximum((1.0 - ac_s) / (1.0 - ac_t) * beta, 1e-20)
    else:
      var = beta
    std = jnp.where(t > 0, jnp.sqrt(var), 0.0)
    return mean + std * step_noise(keys, j, x.shape[1:], x.dtype), None

  x, _ = jax.lax.scan(body, x, _steps(ts))
  return x


def ddim_sample(
    denoise_fn: DenoiseFn,
    x_T: jnp.ndarray,
    keys: Optional[jax.Array],
    schedule: Schedule,
    *,
    num_steps: int,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: tuple[float, float] = (-1.0, 1.0),
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
) -> jnp.ndarray:
  """DDIM (Song et al. 2021, eq. 12 and 16) as MONAI's `DDIMScheduler.step`.

  Each step goes from the listed timestep t to the next listed one, except with
  `timestep_spacing="monai"`, MONAI 1.6's own rule (t → t − T // N on the "linspace" listing;
  see `ddim_transitions`), which reproduces a loop over its default `DDIMScheduler`.

  Args:
    denoise_fn: `(x, t) -> model_output`, see the module docstring.
    x_T: (B, ...) initial Gaussian noise.
    keys: (B,) PRNG keys, one per sample; unused (may be None) when eta == 0.
    schedule: the training schedule.
    num_steps: N ≤ T network evaluations (the paper: 50).
    eta: a static Python float in [0, 1]: σ_t = eta · sqrt(β̃); 0 is deterministic DDIM,
      1 the DDPM posterior variance. Real noise is added when eta > 0.
    prediction_type: "epsilon", "sample" or "v_prediction".
    clip_sample: clip x̂_0 to `clip_sample_range` (ε̂ is not recomputed, as in MONAI).
    clip_sample_range: (min, max) for `clip_sample`.
    timestep_spacing: "leading" (the paper, MONAI GenerativeModels), "linspace", "quadratic",
      or "monai" (MONAI 1.6's DDIMScheduler: linspace listing, steps of T // N).
    steps_offset: MONAI's `steps_offset`.
    set_alpha_to_one: MONAI's option: ᾱ after the last step is 1, else ᾱ_0.

  Returns:
    (B, ...) float32 samples.
  """
  check_prediction_type(prediction_type)
  if not 0.0 <= eta <= 1.0:
    raise ConfigError(f"sampling.eta must be in [0, 1], got {eta}.")
  ts, previous = ddim_transitions(schedule.num_train_timesteps, num_steps, timestep_spacing,
                                  steps_offset)
  x = _prepare(x_T, keys, eta > 0, "ddim with eta > 0")
  final = _final_alpha_cumprod(schedule, set_alpha_to_one)

  def body(x, step):
    j, t, s = step
    ac_t = schedule.alphas_cumprod[t]
    ac_s = _alpha_cumprod_at(schedule, s, final)
    x0, eps = _predict_x0_eps(_model_output(denoise_fn, x, t), x, ac_t, prediction_type)
    if clip_sample:
      x0 = jnp.clip(x0, *clip_sample_range)
    x_s = jnp.sqrt(ac_s) * x0
    if eta > 0:
      std = eta * jnp.sqrt((1.0 - ac_s) / (1.0 - ac_t) * (1.0 - ac_t / ac_s))
      x_s = x_s + jnp.sqrt(1.0 - ac_s - std**2) * eps
      x_s = x_s + std * step_noise(keys, j, x.shape[1:], x.dtype)
    else:
      x_s = x_s + jnp.sqrt(1.0 - ac_s) * eps
    return x_s, None

  x, _ = jax.lax.scan(body, x, _steps(ts, previous))
  return x


def dpmpp_2m_sample(
    denoise_fn: DenoiseFn,
    x_T: jnp.ndarray,
    schedule: Schedule,
    *,
    num_steps: int,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: tuple[float, float] = (-1.0, 1.0),
    timestep_spacing: str = "quadratic",
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
) -> jnp.ndarray:
  """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second-order multistep on the data prediction.

  It solves the probability-flow ODE of the same discrete schedule: α_t = sqrt(ᾱ_t),
  σ_t = sqrt(1 − ᾱ_t), λ_t = log(α_t/σ_t), at N integer timesteps. These are static (known at
  trace time, independent of the schedule's values) and by default "quadratic" in t (see
  `ddim_timesteps`): uniform-in-t steps leave one huge λ step at the end, where second-order
  extrapolation gains nothing; uniform-in-λ steps would need the schedule's values at trace
  time and repeat integer timesteps near t = 0. With D the x̂_0 prediction,
    x_u = (σ_u/σ_s) x_s + (α_u − σ_u α_s/σ_s) D̃,  D̃ = (1 + 1/2r) D_s − (1/2r) D_prev,
  r = h_prev / h, h = λ_u − λ_s (the exponential integrator written without e^{−h}, so that it
  also holds at σ_u = 0). The first step is first order (no history), and so is the last when
  it ends at the clean point σ = 0 (λ = ∞, where the second-order weights do not exist): it
  then returns x̂_0 from the last listed timestep, as DDIM's last step does.

  Args:
    denoise_fn: `(x, t) -> model_output`, see the module docstring.
    x_T: (B, ...) initial Gaussian noise.
    schedule: the training schedule.
    num_steps: N network evaluations (15–25 is typical).
    prediction_type: "epsilon", "sample" or "v_prediction".
    clip_sample: clip each x̂_0 to `clip_sample_range`.
    clip_sample_range: (min, max) for `clip_sample`.
    timestep_spacing: see `ddim_timesteps`.
    steps_offset: see `ddim_timesteps`.
    set_alpha_to_one: end at ᾱ = 1 (clean); else at ᾱ_0 as MONAI's DDIM option.

  Returns:
    (B, ...) float32 samples.
  """
  check_prediction_type(prediction_type)
  no_monai_rule(timestep_spacing, "dpmpp_2m")
  ts = ddim_timesteps(schedule.num_train_timesteps, num_steps, timestep_spacing, steps_offset)
  x = _prepare(x_T, None, False, "dpmpp_2m")
  final = _final_alpha_cumprod(schedule, set_alpha_to_one)
  # λ at the previously visited timestep, for h_prev; entry 0 is never used (first order).
  before = jnp.asarray(np.insert(ts[:-1], 0, ts[0]))

  def body(carry, step):
    x, d_prev = carry
    (j, t, u), t_before = step
    ac_t = schedule.alphas_cumprod[t]
    ac_u = _alpha_cumprod_at(schedule, u, final)
    a_t, s_t = jnp.sqrt(ac_t), jnp.sqrt(1.0 - ac_t)
    a_u, s_u = jnp.sqrt(ac_u), jnp.sqrt(1.0 - ac_u)
    d, _ = _predict_x0_eps(_model_output(denoise_fn, x, t), x, ac_t, prediction_type)
    if clip_sample:
      d = jnp.clip(d, *clip_sample_range)
    clean_end = (u < 0) & set_alpha_to_one
    second = (j > 0) & ~clean_end
    # Safe λ_u at the clean end (λ = ∞): that branch is first order and never reads it.
    lam_t = log_snr(ac_t)
    lam_u = jnp.where(clean_end, lam_t + 1.0, log_snr(ac_u))
    h = lam_u - lam_t
    h_prev = lam_t - log_snr(schedule.alphas_cumprod[t_before])
    half_inv_r = jnp.where(second, 0.5 * h / jnp.where(second, h_prev, 1.0), 0.0)
    d_tilde = (1.0 + half_inv_r) * d - half_inv_r * d_prev
    x_u = (s_u / s_t) * x + (a_u - s_u * a_t / s_t) * d_tilde
    return (x_u, d), None

  (x, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), (_steps(ts), before))
  return x


def sample(
    denoise_fn: DenoiseFn,
    x_T: jnp.ndarray,
    keys: Optional[jax.Array],
    schedule: Schedule,
    *,
    sampler: str,
    num_steps: int,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: tuple[float, float] = (-1.0, 1.0),
    timestep_spacing: Optional[str] = None,
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
    variance_type: str = "fixed_small",
) -> jnp.ndarray:
  """Runs `sampler` ("ddpm", "ddim" or "dpmpp_2m"); options as in the sampler's own function.

  `timestep_spacing=None` (or "", as older runs' configs spell it) takes the sampler's default:
  "linspace" for DDPM (MONAI's rule), "leading" for DDIM (the paper's), "quadratic" for
  DPM-Solver++.

  An option that the chosen sampler does not have must keep its default (e.g. eta for DDPM,
  whose noise is fixed by `variance_type`; keys are unused by "dpmpp_2m"), so that no setting is
  silently ignored. All keyword options are static (hashable Python values).
  """
  common = dict(num_steps=num_steps, prediction_type=prediction_type, clip_sample=clip_sample,
                clip_sample_range=clip_sample_range, steps_offset=steps_offset)
  if timestep_spacing:
    common["timestep_spacing"] = timestep_spacing

  def unsupported(**options):
    bad = [name for name, (value, default) in options.items() if value != default]
    if bad:
      raise ValueError(f"sampler {sampler!r} has no option(s) {bad}; leave them at their "
                       "defaults.")

  if sampler == "ddpm":
    unsupported(eta=(eta, 0.0), set_alpha_to_one=(set_alpha_to_one, True))
    return ddpm_sample(denoise_fn, x_T, keys, schedule, variance_type=variance_type, **common)
  if sampler == "ddim":
    unsupported(variance_type=(variance_type, "fixed_small"))
    return ddim_sample(denoise_fn, x_T, keys, schedule, eta=eta,
                       set_alpha_to_one=set_alpha_to_one, **common)
  if sampler == "dpmpp_2m":
    unsupported(eta=(eta, 0.0), variance_type=(variance_type, "fixed_small"))
    return dpmpp_2m_sample(denoise_fn, x_T, schedule, set_alpha_to_one=set_alpha_to_one,
                           **common)
  raise ConfigError(f"sampling.sampler must be one of {SAMPLERS}, got {sampler!r}.")
