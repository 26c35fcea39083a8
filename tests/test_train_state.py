"""The optimizer a training section asks for (its learning-rate schedule), and what the
autoencoder step trains on (random crops)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from brain_ldm_jax.train import autoencoder as autoencoder_train
from brain_ldm_jax.train import state as state_lib


def _updates(schedule: str, num_steps: int, decay_fraction: float = 1.0) -> list[float]:
  """The size of each of `num_steps` Adam updates under a constant unit gradient."""
  section = ml_collections.ConfigDict(dict(learning_rate=1e-2, num_steps=num_steps,
                                           lr_schedule=schedule, lr_decay_fraction=decay_fraction))
  tx = state_lib.adam(state_lib.learning_rate(section))
  params = {"w": jnp.zeros(3)}
  opt_state = tx.init(params)
  sizes = []
  for _ in range(num_steps):
    updates, opt_state = tx.update({"w": jnp.ones(3)}, opt_state, params)
    sizes.append(float(jnp.abs(updates["w"]).max()))
  return sizes


def test_constant_keeps_the_learning_rate():
  np.testing.assert_allclose(_updates("constant", 5), 1e-2, rtol=1e-4)


def test_cosine_starts_at_the_learning_rate_and_decays_to_zero():
  sizes = _updates("cosine", 8)
  assert sizes[0] == pytest.approx(1e-2, rel=1e-4)
  assert sizes[4] == pytest.approx(0.5e-2, rel=1e-4)  # half-way down the cosine
  assert all(a > b for a, b in zip(sizes, sizes[1:]))
  assert sizes[-1] < 0.04e-2


def test_late_cosine_holds_the_rate_then_decays_over_the_last_fraction():
  sizes = _updates("cosine", 16, decay_fraction=0.25)
  np.testing.assert_allclose(sizes[:13], 1e-2, rtol=1e-4)  # 12 constant steps, the cosine's first
  assert sizes[14] == pytest.approx(0.5e-2, rel=1e-4)  # half-way down the 4-step cosine
  assert sizes[13] > sizes[14] > sizes[15]


@pytest.mark.parametrize("adv_weight, start, adversarial_steps", [
    (1e-2, 0, [1, 2, 3]), (1e-2, 2, [3]), (0.0, 0, [])])
def test_the_discriminator_trains_after_its_warm_up_and_never_at_zero_weight(
    adv_weight, start, adversarial_steps):
  train_ae = ml_collections.ConfigDict(dict(adv_weight=adv_weight, adv_start_step=start))
  assert [s for s in (1, 2, 3) if autoencoder_train.is_adversarial(train_ae, s)] == adversarial_steps


def test_random_crops_are_blocks_of_each_image_at_random_places():
  # Each voxel holds its own flat index, so a crop says where it came from.
  x = jnp.arange(4 * 8 * 10 * 6, dtype=jnp.float32).reshape(4, 8, 10, 6, 1)
  crops = np.asarray(autoencoder_train.random_crops(jax.random.key(0), x, (4, 4, 2)))
  assert crops.shape == (4, 4, 4, 2, 1)
  starts = set()
  for i, crop in enumerate(crops):
    start = np.unravel_index(int(crop[0, 0, 0, 0] - x[i, 0, 0, 0, 0]), (8, 10, 6))
    np.testing.assert_array_equal(
        crop, np.asarray(x[i, start[0]:start[0] + 4, start[1]:start[1] + 4, start[2]:start[2] + 2]))
    starts.add(start)
  assert len(starts) > 1
  np.testing.assert_array_equal(
      crops, autoencoder_train.random_crops(jax.random.key(0), x, (4, 4, 2)))
