"""The autoencoder's perceptual loss on a random-weight MedicalNet ResNet-10 file."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brain_ldm_jax.errors import ConfigError
from brain_ldm_jax.train import perceptual
from conftest import import_reference
from test_metrics_med3d import _torch_medicalnet


def write_medicalnet_file(path: str) -> str:
  """A ResNet-10 checkpoint in MedicalNet's published format, random weights."""
  torch = import_reference("torch")
  torch.manual_seed(10)
  model = _torch_medicalnet(torch, "basic", (1, 1, 1, 1))
  torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
  return path


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory):
  return write_medicalnet_file(str(tmp_path_factory.mktemp("medicalnet") / "resnet_10.pth"))


def test_perceptual_loss_is_a_differentiable_distance(weights_path):
  loss = perceptual.make_perceptual_loss(weights_path)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(0, 1, (2, 16, 16, 16, 1)), jnp.float32)
  y = jnp.asarray(rng.uniform(0, 1, (2, 16, 16, 16, 1)), jnp.float32)
  value_and_grad = jax.jit(jax.value_and_grad(loss))
  different, grad = value_and_grad(x, y)
  same, grad_same = value_and_grad(y, y)
  # Unit feature vectors: the squared distance per voxel lies in [0, 4].
  assert 0 < float(different) <= 4
  assert float(same) < 1e-10  # the two feature passes may round differently inside one program
  grad = np.asarray(grad)
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
  assert np.abs(np.asarray(grad_same)).max() < 1e-6
  # A reconstruction closer to the target scores lower.
  closer, _ = value_and_grad(0.9 * y + 0.1 * x, y)
  assert 0 < float(closer) < float(different)


def test_perceptual_loss_refuses_a_missing_file(tmp_path):
  with pytest.raises(ConfigError, match="train_ae.perceptual_weights_path"):
    perceptual.make_perceptual_loss(str(tmp_path / "nope.pth"))
