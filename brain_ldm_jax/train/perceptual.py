"""The autoencoder's perceptual loss: MONAI's MedicalNet perceptual similarity, in JAX.

It is on only when the user gives pretrained MedicalNet (Med3D) weights: a perceptual loss on
random features would be noise presented as a loss. As MONAI's `MedicalNetPerceptualSimilarity`:
z-score each volume, take the ResNet's last feature map, normalise each voxel's feature vector to
unit length, and average the squared difference over space (summed over channels).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from brain_ldm_jax.metrics import med3d

FIELD = "train_ae.perceptual_weights_path"


def _unit_features(x: jax.Array, eps: float = 1e-10) -> jax.Array:
  return x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)) + eps)


def perceptual_distance(module: med3d.Med3DResNet, variables, x: jax.Array,
                        y: jax.Array) -> jax.Array:
  """Per-example perceptual distance between channels-last volumes x and y, (B,)."""
  fx = module.apply(variables, med3d.normalize_volumes(x.astype(jnp.float32), "zscore"))
  fy = module.apply(variables, med3d.normalize_volumes(y.astype(jnp.float32), "zscore"))
  diff = jnp.sum(jnp.square(_unit_features(fx) - _unit_features(fy)), axis=-1)
  return jnp.mean(diff, axis=tuple(range(1, diff.ndim)))


def make_perceptual_loss(weights_path: str, depth: int | None = None) -> Callable:
  """(recon, target) -> mean perceptual distance, with frozen MedicalNet features."""
  module, variables = med3d.load_med3d(weights_path, depth, field=FIELD)
  module = module.clone(pool=False)
  variables = jax.lax.stop_gradient(variables)

  def loss(recon, target):
    return jnp.mean(perceptual_distance(module, variables, recon, target))

  return loss
