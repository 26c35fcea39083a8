"""Build a blinded real-vs-synthetic reader study (a static HTML page + a private answer key).

    python -m brain_ldm_jax.main --config=configs/reader_study.py --workdir=DIR \
        --config.reader_study.real_dir=REAL --config.reader_study.synthetic_dir=SYNTH

Both folders are searched recursively for *.nii / *.nii.gz. `real_dir` defaults to
config.data.data_dir, else DIR/cohort when it exists; `synthetic_dir` is required (a folder of
generated volumes). Writes DIR/reader_study/reader_study.html (send to readers) and
DIR/reader_study/answer_key.json (keep private), or into --config.reader_study.out_dir. Score with
`python -m brain_ldm_jax.reader_study.score --key answer_key.json ANSWERS.json ...`.
See docs/reader_study.md.
"""

from ml_collections import config_dict

from brain_ldm_jax import presets


def get_config(preset=None):
  config = presets.base_config(preset)
  config.job = "reader_study"
  config.reader_study = dict(
      real_dir=config_dict.placeholder(str),  # default: config.data.data_dir, else <workdir>/cohort
      synthetic_dir=config_dict.placeholder(str),  # required: folder of generated NIfTI volumes
      num_trials=40,  # a multiple of 2 x len(trial_types): balanced classes and types
      trial_types=("slice", "triplet"),  # single slices and/or orthogonal triplets
      seed=0,  # fixes volumes, views and order (trial ids are random regardless)
      out_dir=config_dict.placeholder(str),  # default: <workdir>/reader_study
      confidence_levels=5,  # rating 1 (guess) .. N (certain)
      position_range=(0.3, 0.7),  # relative slice positions within each brain's bounding box
      clip_percentiles=(0.5, 99.5),  # intensity window percentiles
      window="pooled",  # "pooled": one window from both classes; "per_volume": each its own
      display_size=256,  # longest image side in pixels
      title="Real or synthetic?",
  )
  return config
