"""Stage 1: the KL autoencoder as a VAE-GAN (MONAI's 3d_ldm tutorial, the paper's recipe).

Generator loss: L1 reconstruction + kl_weight · KL + adv_weight · least-squares adversarial (after
`adv_start_step`) + perceptual_weight · perceptual (only when the user gives pretrained feature
weights). The patch discriminator is trained on the same step with the least-squares loss. Before
the adversarial warm-up ends, and throughout when adv_weight is 0, a smaller program without the
discriminator runs. With `clip_reconstruction` the losses judge the reconstruction as the image it
stands for (`networks.as_image`), so that where the image is 0 any output at or below 0 is exact.
"""

# No `from __future__ import annotations`: clu reads the metric annotations at runtime.

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics

from brain_ldm_jax import networks
from brain_ldm_jax import sharding as sharding_lib
from brain_ldm_jax.nn import autoencoder as autoencoder_lib
from brain_ldm_jax.nn import discriminator as discriminator_lib
from brain_ldm_jax.train import state as state_lib


@flax.struct.dataclass
class AEState:
  step: jax.Array
  params: Any
  opt_state: Any
  disc_params: Any
  disc_batch_stats: Any
  disc_opt_state: Any
  key: jax.Array


@flax.struct.dataclass
class AEMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  l1: clu_metrics.Average.from_output("l1")
  kl: clu_metrics.Average.from_output("kl")
  adv_g: clu_metrics.Average.from_output("adv_g")
  adv_d: clu_metrics.Average.from_output("adv_d")
  perceptual: clu_metrics.Average.from_output("perceptual")


def kl_divergence(mean, logvar):
  """KL(q(z|x) || N(0, I)) summed over the latent, averaged over the batch (as MONAI's tutorial)."""
  axes = tuple(range(1, mean.ndim))
  kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - logvar - 1.0, axis=axes)
  return jnp.mean(kl)


def lsgan_generator_loss(logits_fake):
  return jnp.mean(jnp.square(logits_fake - 1.0))


def lsgan_discriminator_loss(logits_fake, logits_real):
  return 0.5 * (jnp.mean(jnp.square(logits_fake)) + jnp.mean(jnp.square(logits_real - 1.0)))


def _discriminate(disc, disc_params, batch_stats, x):
  """Logits of the patch discriminator in training mode, and its updated batch statistics."""
  outputs, updates = disc.apply({"params": disc_params, "batch_stats": batch_stats}, x,
                                use_running_average=False, mutable=["batch_stats"])
  # Like MONAI's, the discriminator returns every layer's output; the last one is the logits.
  return outputs[-1].astype(jnp.float32), updates["batch_stats"]


def random_crops(key, x, patch_shape):
  """One crop of `patch_shape` per example of `x` [batch, *spatial, channels], placed at random."""
  spatial = x.shape[1:-1]

  def crop(k, volume):
    starts = [jax.random.randint(axis_key, (), 0, n - p + 1)
              for axis_key, n, p in zip(jax.random.split(k, len(spatial)), spatial, patch_shape)]
    return jax.lax.dynamic_slice(volume, (*starts, 0), (*patch_shape, volume.shape[-1]))

  return jax.vmap(crop)(jax.random.split(key, x.shape[0]), x)


def ae_train_step(state: AEState, batch, *, autoencoder, disc, tx, disc_tx, kl_weight,
                  adv_weight, perceptual_weight, perceptual_fn: Callable | None, adversarial: bool,
                  patch_shape=None, clip_reconstruction=False):
  """One VAE-GAN step (generator, then discriminator on the detached reconstruction).

  With `patch_shape`, both networks see one random crop of each image instead of the whole: the
  autoencoder is convolutional, so what it learns on crops applies to whole images.
  """
  x = batch["image"]
  key = state_lib.step_key(state.key, state.step)
  if patch_shape is not None:
    crop_key, key = jax.random.split(key)
    x = random_crops(crop_key, x, tuple(patch_shape))

  def generator_loss(params):
    recon, mean, logvar = autoencoder.apply({"params": params}, x, key)
    recon = recon.astype(jnp.float32)
    if clip_reconstruction:  # every loss judges the image the output stands for
      recon = networks.as_image(recon)
    l1 = jnp.mean(jnp.abs(recon - x))
    kl = kl_divergence(mean.astype(jnp.float32), logvar.astype(jnp.float32))
    loss = l1 + kl_weight * kl
    perceptual = jnp.zeros(())
    if perceptual_fn is not None:
      perceptual = perceptual_fn(recon, x)
      loss = loss + perceptual_weight * perceptual
    adv_g = jnp.zeros(())
    if adversarial:
      logits_fake, _ = _discriminate(disc, state.disc_params, state.disc_batch_stats, recon)
      adv_g = lsgan_generator_loss(logits_fake)
      loss = loss + adv_weight * adv_g
    return loss, (recon, dict(loss=loss, l1=l1, kl=kl, adv_g=adv_g, perceptual=perceptual))

  grads, (recon, scalars) = jax.grad(generator_loss, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  state = state.replace(params=params, opt_state=opt_state)

  adv_d = jnp.zeros(())
  if adversarial:
    fake = jax.lax.stop_gradient(recon)

    def discriminator_loss(disc_params):
      # Two calls, as MONAI's tutorial makes them: BatchNorm normalises fakes and reals each
      # with their own batch statistics.
      logits_fake, stats = _discriminate(disc, disc_params, state.disc_batch_stats, fake)
      logits_real, stats = _discriminate(disc, disc_params, stats, x)
      return adv_weight * lsgan_discriminator_loss(logits_fake, logits_real), stats

    (adv_d, stats), disc_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(
        state.disc_params)
    disc_updates, disc_opt_state = disc_tx.update(disc_grads, state.disc_opt_state,
                                                  state.disc_params)
    state = state.replace(disc_params=optax.apply_updates(state.disc_params, disc_updates),
                          disc_opt_state=disc_opt_state, disc_batch_stats=stats)
  scalars["adv_d"] = adv_d
  return state.replace(step=state.step + 1), AEMetrics.single_from_model_output(**scalars)


def reconstruct(autoencoder, params, images):
  """Deterministic reconstruction through the posterior mean (for image summaries)."""
  mean, _ = autoencoder.apply({"params": params}, images, method="encode")
  return networks.as_image(autoencoder.apply({"params": params}, mean, method="decode"))


def is_adversarial(train_ae, step_number: int) -> bool:
  """Whether step `step_number` (counted from 1) trains with the discriminator."""
  return train_ae.adv_weight > 0 and step_number > train_ae.adv_start_step


def build(config, mesh, key, perceptual_fn=None):
  """Networks, sharded init, and the two jitted steps (before / after the adversarial warm-up)."""
  autoencoder = autoencoder_lib.build_autoencoder(config.autoencoder)
  disc = discriminator_lib.build_discriminator(config.discriminator)
  t = config.train_ae
  tx = state_lib.adam(state_lib.learning_rate(t))
  disc_tx = state_lib.adam(t.disc_learning_rate)
  image_shape = (1,) + tuple(config.data.shape) + (config.autoencoder.in_channels,)

  def init_fn():
    x = jnp.zeros(image_shape)
    params = autoencoder.init(jax.random.fold_in(key, 0), x, jax.random.fold_in(key, 1))["params"]
    variables = disc.init(jax.random.fold_in(key, 2), x)
    return AEState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   disc_params=variables["params"],
                   disc_batch_stats=variables.get("batch_stats", {}),
                   disc_opt_state=disc_tx.init(variables["params"]),
                   key=jax.random.key_data(jax.random.fold_in(key, 3)))

  init, shardings, abstract = state_lib.init_sharded(init_fn, mesh, config.mesh.fsdp_min_size)
  common = dict(autoencoder=autoencoder, disc=disc, tx=tx, disc_tx=disc_tx,
                kl_weight=t.kl_weight, adv_weight=t.adv_weight,
                perceptual_weight=t.perceptual_weight, perceptual_fn=perceptual_fn,
                patch_shape=t.get("patch_shape"),
                clip_reconstruction=t.get("clip_reconstruction", False))
  batch_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)

  def jit_step(adversarial):
    return jax.jit(functools.partial(ae_train_step, adversarial=adversarial, **common),
                   in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))

  warmup_step, adversarial_step = jit_step(False), jit_step(True)

  def step(state, batch, step_number):
    return (adversarial_step if is_adversarial(t, step_number) else warmup_step)(state, batch)

  return dict(autoencoder=autoencoder, disc=disc, init=init, abstract=abstract, step=step,
              warmup_step=warmup_step, adversarial_step=adversarial_step)
