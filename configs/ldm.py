"""The whole job: cohort (synthetic if no data) -> autoencoder -> latent diffusion -> samples.

    python -m brain_ldm_jax.main --config=configs/ldm.py[:demo|:paper|:test] --workdir=DIR
"""

from brain_ldm_jax import presets


def get_config(preset=None):
  config = presets.base_config(preset)
  config.job = "ldm"
  return config
