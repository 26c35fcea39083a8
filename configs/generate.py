r"""Generate a synthetic BIDS dataset from a trained run.

    python -m brain_ldm_jax.main --config=configs/generate.py --workdir=OUT \
        --config.generate.run_dir=runs/demo --config.generate.num_subjects=1000

    # covariates from a table (natural units; participant_id optional):
    python -m brain_ldm_jax.main --config=configs/generate.py --workdir=OUT \
        --config.generate.run_dir=runs/demo --config.generate.covariates_tsv=wanted.tsv

The networks, covariates and statistics come from the run (its run.json); of this config only the
`generate` and `mesh` sections are used. A rerun on the same OUT resumes: finished subjects are
kept, unfinished ones redone, the tables rebuilt.
"""

import ml_collections
from ml_collections import config_dict

from brain_ldm_jax import presets


def get_config(preset=None):
  config = presets.base_config(preset)
  config.job = "generate"
  g = ml_collections.ConfigDict()
  g.run_dir = config_dict.placeholder(str)  # required: the workdir of a trained run (run.json)
  g.out_dir = config_dict.placeholder(str)  # default: --workdir
  # How many subjects. With covariates_tsv, 0 takes every row and N takes the first N rows;
  # without one it is required.
  g.num_subjects = 0
  # Optional: one row per subject, columns = the run's covariate names.
  g.covariates_tsv = config_dict.placeholder(str)
  # Drawn covariates (no covariates_tsv) are balanced over age bins x sex when stratify is set.
  g.stratify = False
  g.age_bins = 4  # equal-width bins over the run's training age range
  g.seed = 0  # subject i's noise is fold_in(key(seed), i); covariates are drawn from seed too
  g.batch_size = 4  # global: split over processes, then over each process's devices
  # Sampler settings; unset: the run's config.sampling.
  g.sampler = config_dict.placeholder(str)  # ddpm | ddim | dpmpp_2m
  g.num_steps = config_dict.placeholder(int)
  g.eta = config_dict.placeholder(float)
  g.guidance_scale = config_dict.placeholder(float)
  # True: every subject runs through the same batch-1 program, so images are bitwise identical
  # whatever the batch size or device count. False: one batched program (faster on
  # accelerators, equal to float rounding only).
  g.per_sample_program = True
  g.output_dtype = "float32"  # float32 | int16 (scaled, half the size)
  g.writer_threads = 2  # NIfTI compression + writing threads
  g.max_pending_subjects = 0  # bound of the write queue; 0: 2 global batches
  g.progress_every_s = 10.0
  g.overwrite = False  # True: regenerate every subject even if finished or made differently
  config.generate = g
  return config
