r"""Counterfactuals of real subjects: each brain with other covariates, by DDIM inversion.

    python -m brain_ldm_jax.main --config=configs/counterfactual.py --workdir=runs/demo \
        --config.counterfactual.change="age=+10"          # or "ventricular_volume=*1.5",
                                                            # "brain_volume=1200", "sex=F"
    # per-subject targets (participant_id + covariate columns, natural units):
    python -m brain_ldm_jax.main --config=configs/counterfactual.py --workdir=runs/demo \
        --config.counterfactual.targets_tsv=targets.tsv --config.counterfactual.cohort=COHORT

Writes WORKDIR/counterfactual/ (edited, reconstruction and difference NIfTI and a figure per
subject, changes.tsv, summary.json). The networks, covariates and grid come from the run (its
run.json); of this config only the `counterfactual` section is used.
"""

from ml_collections import config_dict

from brain_ldm_jax import presets


def get_config(preset=None):
  config = presets.base_config(preset)
  config.job = "counterfactual"
  preset = config.preset
  config.counterfactual = config_dict.ConfigDict(dict(
      run_dir=config_dict.placeholder(str),  # trained run (holds run.json); default: --workdir
      out_dir=config_dict.placeholder(str),  # default: <workdir>/counterfactual
      # participants.tsv or BIDS folder; default: the run's validation subjects.
      cohort=config_dict.placeholder(str),
      # e.g. "age=+10, ventricular_volume=*1.5" (+/- add, * scale, plain value sets).
      change=config_dict.placeholder(str),
      # Instead of change: participant_id + target columns per subject.
      targets_tsv=config_dict.placeholder(str),
      max_subjects=config_dict.placeholder(int),  # default: all
      # DDIM steps of the inversion and of the regeneration; default: the run's sampling.
      num_steps=config_dict.placeholder(int),
      guidance_scale=config_dict.placeholder(float),  # default: the run's sampling.guidance_scale
      strength=1.0,  # fraction of the steps inverted, in (0, 1]; < 1 keeps more of the subject
      batch_size={"paper": 2, "demo": 4, "test": 2}[preset],
      calibration_subjects={"paper": 300, "demo": 60, "test": 8}[preset],  # 0: all training
      # A stored metrics.volumes calibration JSON instead of fitting one.
      calibration_path=config_dict.placeholder(str),
  ))
  return config
