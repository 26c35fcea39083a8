"""A run's two sampling networks from its config: the modules, the latent grid, the parameters.

The one derivation of what a run's parameter tree looks like (`param_shapes`): checks of loaded
weights compare against it, and tests and benchmarks fill it with numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from brain_ldm_jax.errors import ConfigError
from brain_ldm_jax.nn import autoencoder as autoencoder_lib
from brain_ldm_jax.nn import unet as unet_lib


def as_image(decoded: jax.Array) -> jax.Array:
  """The image a decoder output stands for: its intensities clipped to the data's [0, 1] range.

  Every consumer of the decoder sees this, so a decoder may put anything at or below 0 where the
  image is 0 (the demo's autoencoder trains its L1 on it: train_ae.clip_reconstruction).
  """
  return jnp.clip(decoded, 0.0, 1.0)


def downsampling_factor(config) -> int:
  """How many image voxels per latent voxel along each axis: one halving per extra level."""
  return 2 ** (len(config.autoencoder.channels) - 1)


def latent_shape(config) -> tuple[int, ...]:
  """(X, Y, Z, C) of a latent: the image shape over the autoencoder's downsampling."""
  factor = downsampling_factor(config)
  shape = tuple(config.data.shape)
  if any(s % factor for s in shape):
    raise ConfigError(f"data.shape={shape} must be divisible by the autoencoder's downsampling "
                      f"factor {factor} (2 ** (len(autoencoder.channels) - 1))")
  return tuple(s // factor for s in shape) + (config.autoencoder.latent_channels,)


def init_params(config, key: jax.Array) -> dict:
  """Freshly initialised `{"autoencoder": ..., "unet": ...}` parameters of a run's networks."""
  unet = unet_lib.build_unet(config.unet)
  autoencoder = autoencoder_lib.build_autoencoder(config.autoencoder)
  x, context = unet_lib.hybrid_conditioning(jnp.zeros((1,) + latent_shape(config)),
                                            jnp.zeros((1, len(config.data.covariates))))
  u = unet.init(key, x, jnp.zeros((1,), jnp.int32), context=context)["params"]
  image = jnp.zeros((1,) + tuple(config.data.shape) + (config.autoencoder.in_channels,))
  a = autoencoder.init(key, image, key)["params"]
  return {"autoencoder": a, "unet": u}


def param_shapes(config) -> dict:
  """The abstract parameter tree (jax.ShapeDtypeStruct leaves) of `init_params`; no compute."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
