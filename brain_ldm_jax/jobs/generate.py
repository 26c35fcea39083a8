r"""The `generate` job: a synthetic BIDS dataset of N brains from a trained run (generate.py).

    python -m brain_ldm_jax.main --config=configs/generate.py --workdir=OUT \
        --config.generate.run_dir=RUN --config.generate.num_subjects=1000

A rerun of the same command resumes: finished subjects are kept, the rest is redone.
"""

from __future__ import annotations

import os

import jax
from absl import logging

from brain_ldm_jax import bids
from brain_ldm_jax import generate
from brain_ldm_jax import files
from brain_ldm_jax import multihost
from brain_ldm_jax import sampling


def run_generate_job(config, workdir: str) -> None:
  """Samples the plan's unfinished subjects, then writes the tables and checks the dataset."""
  s = generate.settings_from_config(config, workdir)
  run = generate.load_checked_run(s.run_dir)
  plan = generate.make_plan(run, s)
  os.makedirs(s.out_dir, exist_ok=True)
  generate.check_or_write_plan(plan, s.out_dir, s.overwrite)
  if s.overwrite:
    generate.remove_other_subjects(s.out_dir, plan.num_subjects)
  if jax.process_index() == 0:
    files.remove_temporaries(s.out_dir)
  mesh = sampling.local_mesh(config.mesh)
  logging.info("generating %d subjects from %s into %s: %s, seed %d; covariates %s",
               plan.num_subjects, s.run_dir, s.out_dir, plan.sampling, s.seed, plan.source)
  summary = generate.generate_subjects(run, plan, s.out_dir, mesh=mesh, batch_size=s.batch_size,
                                       writer_threads=s.writer_threads,
                                       max_pending_subjects=s.max_pending_subjects,
                                       overwrite=s.overwrite, progress_every_s=s.progress_every_s)
  multihost.barrier("generate_subjects_done")
  bids.write_tables(plan, s.out_dir)
  rate = summary.generated / summary.wall_s if summary.wall_s > 0 else 0.0
  logging.info(
      "done: %s — process %d generated %d subjects (%d already finished) in %.1f s, "
      "%.3f subjects/s (%.2f s/subject after the first batch, which includes compilation); "
      "waited %.1f s for the writers", s.out_dir, jax.process_index(), summary.generated,
      summary.skipped, summary.wall_s, rate, summary.steady_s_per_subject, summary.writer_wait_s)
  if jax.process_index() == 0:
    problems = bids.check_bids_dataset(s.out_dir)
    if problems:  # only when another process's disk is not shared, or the folder has extras
      logging.warning("dataset check: %d problem(s), first: %s", len(problems), problems[:5])
