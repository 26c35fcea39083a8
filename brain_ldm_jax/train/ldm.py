"""Stage 2: the latent diffusion model, trained on the frozen autoencoder's latents.

Each step takes the frozen encoder's posterior of the batch (its mean or a sample; encoded in the
step, or once for the whole training set when `train_ldm.cache_latents`), scales the latent,
noises it at random timesteps and regresses the UNet's output on the diffusion target (ε in the
paper), with covariates as extra channels and as a one-token cross-attention context. AdamW, an EMA
of the UNet weights, and optional condition dropout for classifier-free guidance.
"""

# No `from __future__ import annotations`: clu reads the metric annotations at runtime.

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics

from brain_ldm_jax import networks
from brain_ldm_jax import sharding as sharding_lib
from brain_ldm_jax.diffusion import guidance
from brain_ldm_jax.diffusion import losses as diffusion_losses
from brain_ldm_jax.diffusion import schedules
from brain_ldm_jax.errors import ConfigError
from brain_ldm_jax.nn import autoencoder as autoencoder_lib
from brain_ldm_jax.nn import unet as unet_lib
from brain_ldm_jax.train import state as state_lib


@flax.struct.dataclass
class LDMState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  key: jax.Array  # raw uint32 key data of the run's LDM key


@flax.struct.dataclass
class LDMMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")


def posterior_latent(mean, logvar, key, latent_mode: str):
  """The latent a step trains on: the encoder posterior's mean, or one sample of it."""
  if latent_mode == "sample":
    return autoencoder_lib.sample_latent(mean, logvar, key)
  if latent_mode == "mean":
    return mean
  raise ConfigError(f"train_ldm.latent={latent_mode!r}: use 'mean' or 'sample'")


def batch_posterior(autoencoder, ae_params, batch):
  """(mean, log-variance) of a batch: cached ones when the batch carries them, else encoded."""
  if "latent_mean" in batch:
    return batch["latent_mean"], batch["latent_logvar"]
  return autoencoder.apply({"params": ae_params}, batch["image"], method="encode")


def latent_scale_factor(autoencoder, ae_params, images, setting: str) -> float:
  """1/std of the latents of `images` ("std", the MONAI tutorial) or a fixed number ("1.0")."""
  if setting == "std":
    mean, _ = jax.jit(functools.partial(autoencoder.apply, method="encode"))(
        {"params": ae_params}, images)
    return float(1.0 / jnp.std(mean))
  try:
    return float(setting)
  except ValueError:
    raise ConfigError(f"train_ldm.scale_factor={setting!r}: use 'std' or a number") from None


def ldm_loss(params, unet, z0, cond, key, schedule, prediction_type: str):
  """The denoising loss of the UNet on latents z0, the covariates as channels and context."""
  def apply_fn(p, zt, t, cond):
    # Only the latent is noised: the covariate channels join it after q_sample.
    x, context = unet_lib.hybrid_conditioning(zt, cond)
    return unet.apply({"params": p}, x, t, context=context)

  return diffusion_losses.denoising_loss(apply_fn, params, z0, key, schedule, prediction_type,
                                         cond=cond)


def ldm_train_step(state: LDMState, batch, ae_params, scale_factor, *, unet, autoencoder, tx,
                   schedule, prediction_type, latent_mode, ema_decay, cond_drop_prob):
  """One optimisation step; pure, so it jits with explicit shardings and donated state."""
  key = state_lib.step_key(state.key, state.step)
  k_latent, k_drop, k_loss = jax.random.split(key, 3)
  mean, logvar = batch_posterior(autoencoder, ae_params, batch)
  z0 = jax.lax.stop_gradient(posterior_latent(mean, logvar, k_latent, latent_mode) * scale_factor)
  cond = batch["cond"]
  if cond_drop_prob > 0:
    cond = guidance.drop_conditions(k_drop, cond, cond_drop_prob)
  loss, grads = jax.value_and_grad(ldm_loss)(state.params, unet, z0, cond, k_loss, schedule,
                                             prediction_type)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=state_lib.ema_update(state.ema_params, params, ema_decay))
  return new_state, LDMMetrics.single_from_model_output(loss=loss)


def build(config, mesh, key):
  """(unet, tx, init, abstract_state, jitted_step, schedule) for `config` on `mesh`."""
  unet = unet_lib.build_unet(config.unet)
  autoencoder = autoencoder_lib.build_autoencoder(config.autoencoder)
  t = config.train_ldm
  tx = state_lib.adam(state_lib.learning_rate(t), t.weight_decay)
  schedule = schedules.schedule_from_config(config.diffusion)
  zshape = networks.latent_shape(config)
  n_cov = len(config.data.covariates)

  def init_fn():
    z = jnp.zeros((1,) + zshape)
    x, context = unet_lib.hybrid_conditioning(z, jnp.zeros((1, n_cov)))
    params = unet.init(jax.random.fold_in(key, 0), x, jnp.zeros((1,), jnp.int32),
                       context=context)["params"]
    return LDMState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=tx.init(params), key=jax.random.key_data(key))

  init, shardings, abstract = state_lib.init_sharded(init_fn, mesh, config.mesh.fsdp_min_size)
  step = functools.partial(
      ldm_train_step, unet=unet, autoencoder=autoencoder, tx=tx, schedule=schedule,
      prediction_type=config.diffusion.prediction_type, latent_mode=t.latent,
      ema_decay=t.ema_decay, cond_drop_prob=t.cond_drop_prob)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)
  jitted = jax.jit(step, in_shardings=(shardings, batch_sharding, None, replicated),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))
  return dict(unet=unet, autoencoder=autoencoder, init=init, abstract=abstract, step=jitted,
              schedule=schedule)

