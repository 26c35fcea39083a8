"""The notebook API: load a trained run, then sample brains with a pure jitted function.

    from brain_ldm_jax import api
    run = api.load_run("runs/demo")                       # workdir of a finished run
    sample = api.make_sampler(run, sampler="ddim", num_steps=50)
    brains = sample(run.params, jax.random.key(0),
                    {"age": [65, 80], "sex": [0, 1],          # sex: 0 female, 1 male
                     "ventricular_volume": [25, 60], "brain_volume": [1100, 1000]})  # mL
    brains.shape  # (2, X, Y, Z), values in [0, 1]

Sample i's noise comes from `fold_in(key, i)`, and each sample runs through the same batch-1
program (`images_fn`), so the same key and covariates give the bitwise same brain whatever the
batch size. Covariates are in natural units and are normalised with the statistics
stored with the run; values outside the training range are allowed (the paper extrapolates on
purpose) but logged as a warning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from brain_ldm_jax import config_checks
from brain_ldm_jax import networks
from brain_ldm_jax.data import manifest
from brain_ldm_jax.diffusion import guidance
from brain_ldm_jax.diffusion import samplers
from brain_ldm_jax.diffusion import schedules
from brain_ldm_jax.errors import DataError
from brain_ldm_jax.nn import autoencoder as autoencoder_lib
from brain_ldm_jax.nn import ops
from brain_ldm_jax.nn import unet as unet_lib
# The notebook reads a run through the API; the format lives in run_dir.
from brain_ldm_jax.run_dir import Run, load_run, save_run  # pylint: disable=unused-import

def covariate_matrix(cond: Mapping[str, Any] | np.ndarray, names: Sequence[str]) -> np.ndarray:
  """(B, n) float64 in natural units from a dict of per-sample values (or an array in order)."""
  if isinstance(cond, Mapping):
    missing = [n for n in names if n not in cond]
    if missing:
      raise DataError(f"covariates missing: {', '.join(missing)} (need {', '.join(names)})")
    unknown = sorted(set(cond) - set(names))
    if unknown:
      raise DataError(f"unknown covariates {', '.join(unknown)}; the run uses {', '.join(names)}")
    columns = [np.atleast_1d(np.asarray(cond[n], np.float64)) for n in names]
    lengths = {c.shape for c in columns}
    if len(lengths) != 1 or columns[0].ndim != 1:
      raise DataError(f"covariates must be equal-length 1-D sequences; got shapes "
                      f"{dict(zip(names, (c.shape for c in columns)))}")
    matrix = np.stack(columns, axis=1)
  else:
    matrix = np.asarray(cond, np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != len(names):
      raise DataError(f"covariate array must have shape (batch, {len(names)}) in the order "
                      f"{', '.join(names)}; got {matrix.shape}")
  if not np.all(np.isfinite(matrix)):
    raise DataError("covariates contain NaN or infinite values")
  return matrix


def normalise_covariates(matrix: np.ndarray, stats: manifest.CovariateStats,
                         names: Sequence[str]) -> np.ndarray:
  """Min-max normalised covariates; a warning for values outside the training range."""
  normalised = np.asarray(stats.normalise(matrix), np.float32)
  outside = (normalised < 0) | (normalised > 1)
  for j in np.nonzero(outside.any(axis=0))[0]:
    logging.warning("covariate %s outside the training range [%g, %g]: extrapolating", names[j],
                    stats.minimum[j], stats.maximum[j])
  return normalised


def sample_keys(key: jax.Array, ids: jax.Array) -> jax.Array:
  """Per-sample keys fold_in(key, id): a sample never depends on its batch or device."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)


def sample_latents_fn(config, scale_factor: float, *, sampler: str, num_steps: int, eta: float,
                      guidance_scale: float) -> Callable:
  """Pure (unet_params, keys (B,), cond (B, n) normalised) -> latents (B, *latent_shape)."""
  ops.ensure_backend()  # before tracing: a notebook may not have chosen one
  unet = unet_lib.build_unet(config.unet)
  schedule = schedules.schedule_from_config(config.diffusion)
  zshape = networks.latent_shape(config)

  def run(unet_params, keys, cond):
    def denoise_with_cond(x, t, c):
      x_in, context = unet_lib.hybrid_conditioning(x, c)
      return unet.apply({"params": unet_params}, x_in, jnp.full((x.shape[0],), t), context=context)

    denoise = guidance.guided(denoise_with_cond, cond, guidance_scale)
    init_keys, step_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
    x_T = jax.vmap(lambda k: jax.random.normal(k, zshape))(init_keys)
    # The UNet's parameters are the same at every step: its prepared kernels are made once.
    with ops.invariant_kernels():
      return samplers.sample(denoise, x_T, step_keys, schedule, sampler=sampler,
                             num_steps=num_steps, eta=eta,
                             clip_sample=config.diffusion.clip_sample,
                             prediction_type=config.diffusion.prediction_type,
                             timestep_spacing=config.sampling.timestep_spacing or None)

  return run


def sampling_options(run: Run, *, sampler: str | None = None, num_steps: int | None = None,
                     eta: float | None = None, guidance_scale: float | None = None) -> dict:
  """The sampler settings to use: the given ones, else the run's `config.sampling` defaults.

  Raises ConfigError for settings the run cannot sample with, e.g. guidance_scale != 1 for a run
  trained without condition dropout (`train_ldm.cond_drop_prob=0`: no unconditional model).
  """
  s = run.config.sampling
  options = dict(sampler=sampler or s.sampler, num_steps=int(num_steps or s.num_steps),
                 eta=float(s.eta if eta is None else eta),
                 guidance_scale=float(s.guidance_scale if guidance_scale is None
                                      else guidance_scale))
  # Guidance is refused for a run trained without condition dropout (converted MONAI runs too).
  config_checks.check_sampling_options(options, run.config)
  return options


def images_fn(run: Run, *, sampler: str, num_steps: int, eta: float, guidance_scale: float,
              per_sample: bool = True) -> Callable:
  """Pure, un-jitted `(params, key, cond (B, n) normalised, ids (B,)) -> (B, X, Y, Z)` in [0, 1].

  Sample b uses fold_in(key, ids[b]). With `per_sample` (the default) the batch runs as a
  `lax.map` of the batch-1 program, so every sample goes through the very same XLA program
  whatever the batch size or device count and comes out bitwise identical (measured on CPU: a
  batched program gives ~4e-6 differences between batch 4 and batch 1, because XLA picks other
  loop tilings and reduction orders for other shapes). `per_sample=False` runs the batch as one
  program: faster on accelerators where batch 1 leaves the device idle, equal only to float
  rounding. The caller jits (or shard_maps) it.
  """
  autoencoder = autoencoder_lib.build_autoencoder(run.config.autoencoder)
  latents = sample_latents_fn(run.config, run.scale_factor, sampler=sampler, num_steps=num_steps,
                              eta=eta, guidance_scale=guidance_scale)
  scale_factor = run.scale_factor

  def batch(params, key, cond, ids):
    keys = sample_keys(key, ids)
    z = latents(params["unet"], keys, cond) / scale_factor
    images = autoencoder.apply({"params": params["autoencoder"]}, z, method="decode")
    return networks.as_image(images[..., 0])

  if not per_sample:
    return batch

  def one_at_a_time(params, key, cond, ids):
    return jax.lax.map(lambda ci: batch(params, key, ci[0][None], ci[1][None])[0], (cond, ids))

  return one_at_a_time


def make_sampler(run: Run, *, sampler: str | None = None, num_steps: int | None = None,
                 eta: float | None = None, guidance_scale: float | None = None,
                 per_sample: bool = True) -> Callable:
  """`sample(params, key, cond) -> (B, X, Y, Z)` in [0, 1]; defaults from the run's config.

  `per_sample`: see `images_fn` (bitwise batch-size invariance, default, vs batched speed).
  """
  options = sampling_options(run, sampler=sampler, num_steps=num_steps, eta=eta,
                             guidance_scale=guidance_scale)
  names = tuple(run.config.data.covariates)
  # Brains for normalised covariates `cond` (B, n); sample b uses fold_in(key, ids[b]).
  sample_normalised = jax.jit(images_fn(run, per_sample=per_sample, **options))

  def sample(params, key, cond, *, first_index: int = 0):
    """Brains for covariates `cond` (natural units); sample i uses fold_in(key, first_index + i)."""
    matrix = covariate_matrix(cond, names)
    normalised = normalise_covariates(matrix, run.stats, names)
    ids = first_index + jnp.arange(normalised.shape[0], dtype=jnp.int32)
    return sample_normalised(params, key, jnp.asarray(normalised), ids)

  sample.normalised = sample_normalised  # for callers that already hold normalised covariates
  return sample


def sweep(sample: Callable, params, key: jax.Array, cond: Mapping[str, float], name: str,
          values: Sequence[float]) -> np.ndarray:
  """Brains that differ only in covariate `name`: (len(values), X, Y, Z), one per value.

  `sample` comes from `make_sampler`; `cond` holds one value per covariate (the fixed ones).
  Every brain starts from the same noise, `fold_in(key, 0)`, so what changes from row to row is
  what the model attributes to the covariate.
  """
  if name not in cond:
    raise DataError(f"sweep: covariate {name!r} is not among {', '.join(cond)}")
  values = np.asarray(values, np.float64)
  if values.ndim != 1 or values.size == 0:
    raise DataError(f"sweep: values of {name} must be a non-empty 1-D sequence; got shape "
                    f"{values.shape}")
  fixed = {}
  for n, c in cond.items():
    if np.size(c) != 1:
      raise DataError(f"sweep: covariate {n} needs one value, got {np.size(c)}")
    fixed[n] = [float(np.ravel(c)[0])]
  # One batch-1 call per value: each sample's id is then 0 (the same noise), and every call
  # reuses the one compiled program.
  return np.stack([np.asarray(sample(params, key, {**fixed, name: [float(v)]}))[0]
                   for v in values])
