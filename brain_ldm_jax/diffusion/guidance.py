"""Classifier-free guidance (Ho & Salimans 2022) for the covariate-conditioned LDM.

The paper's model has no guidance (scale 1); training with `cond_drop_prob > 0` and sampling with
a scale > 1 is an extension. Dropped covariates are replaced by `NULL_COND`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# Covariates are min-max scaled to [0, 1], so 0 is a real subject (the youngest, female, …).
# −1 is outside that range for every covariate and just as easy for the network to tell apart
# whether it sees the covariates as input channels or as the cross-attention token.
NULL_COND = -1.0

CondDenoiseFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def null_cond_like(cond: jnp.ndarray) -> jnp.ndarray:
  """The "no conditioning" input of the same shape and dtype as `cond`."""
  return jnp.full_like(cond, NULL_COND)


def drop_conditions(key: jax.Array, cond: jnp.ndarray, prob: float) -> jnp.ndarray:
  """Replaces each sample's whole covariate vector by `NULL_COND` with probability `prob`.

  Args:
    key: one key for the batch.
    cond: (B, C) covariates in [0, 1].
    prob: drop probability (the config's `train_ldm.cond_drop_prob`); 0 returns `cond` unchanged.

  Returns:
    (B, C) covariates, some rows replaced by `NULL_COND`.
  """
  drop = jax.random.bernoulli(key, prob, (cond.shape[0],))
  drop = drop.reshape((-1,) + (1,) * (cond.ndim - 1))
  return jnp.where(drop, null_cond_like(cond), cond)


def guided(
    denoise_fn_with_cond: CondDenoiseFn, cond: jnp.ndarray, guidance_scale: float
) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
  """A sampler's `denoise_fn(x, t)` with classifier-free guidance at `guidance_scale`.

  Args:
    denoise_fn_with_cond: `(x, t, cond) -> model_output` for a (B, ...) batch and (B, C) cond.
    cond: (B, C) covariates of the samples.
    guidance_scale: a static Python float s. 1: the conditional model alone (one network call of
      batch B per step, the paper); 0: the unconditional model alone (one call); otherwise one
      call on the 2B batch [cond; null], combined as uncond + s · (cond − uncond).

  Returns:
    `denoise_fn(x, t) -> model_output`.
  """
  guidance_scale = float(guidance_scale)
  if guidance_scale == 1.0:
    return lambda x, t: denoise_fn_with_cond(x, t, cond)
  if guidance_scale == 0.0:
    return lambda x, t: denoise_fn_with_cond(x, t, null_cond_like(cond))

  def denoise_fn(x, t):
    both = denoise_fn_with_cond(
        jnp.concatenate([x, x]), t, jnp.concatenate([cond, null_cond_like(cond)]))
    with_cond, without = jnp.split(both, 2)
    return without + guidance_scale * (with_cond - without)

  return denoise_fn
