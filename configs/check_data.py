"""Check a cohort before training: the table and every image header, all problems at once.

    python -m brain_ldm_jax.main --config=configs/check_data.py:paper --workdir=DIR \
        --config.data.data_dir=/data/ukb

Reads participants.tsv and each image's header (not its voxels) and prints a report: exit 0 when
clean (or with --config.data.skip_bad_subjects=True, which lists who training would leave out),
otherwise one error listing every problem. The preset sets the grid the images are checked
against (data.shape, data.spacing). The check itself writes no files.
"""

from brain_ldm_jax import presets


def get_config(preset=None):
  config = presets.base_config(preset)
  config.job = "check_data"
  return config
