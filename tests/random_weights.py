"""Random weights for a run's networks, for tests: no network init has to compile."""

import jax
import numpy as np

from brain_ldm_jax import networks


def random_params(config, seed: int = 0) -> dict:
  """Fan-in-scaled random weights of the run's networks (`networks.param_shapes`), from numpy."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return np.ones(x.shape, np.float32)
    if name.endswith("['bias']"):
      return np.zeros(x.shape, np.float32)
    fan_in = int(np.prod(x.shape[:-1])) or 1
    return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, networks.param_shapes(config))
