"""Make a synthetic cohort from the bundled MNI152 template (NIfTI + participants.tsv).

    python -m brain_ldm_jax.main --config=configs/cohort.py:demo --workdir=DIR \
        --config.data.synthetic.num_subjects=200 --config.data.synthetic.spacing=2.0

Writes DIR/cohort (or --config.cohort.out_dir) in BIDS layout.
"""

from ml_collections import config_dict

from brain_ldm_jax import presets


def get_config(preset=None):
  config = presets.base_config(preset)
  config.job = "cohort"
  config.cohort = dict(out_dir=config_dict.placeholder(str))  # default: <workdir>/cohort
  return config
