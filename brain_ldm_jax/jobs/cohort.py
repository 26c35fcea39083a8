"""The `cohort` job: the demo's synthetic cohort (data/synthetic.py) in a folder of its own."""

from __future__ import annotations

import os

from absl import logging

from brain_ldm_jax.data import synthetic


def run_cohort_job(config, workdir: str) -> None:
  """Writes config.cohort.out_dir (default <workdir>/cohort)."""
  out_dir = config.cohort.out_dir or os.path.join(workdir, "cohort")
  synthetic.build_cohort(out_dir, config.data)
  logging.info("Synthetic cohort ready: %s", os.path.join(out_dir, "participants.tsv"))
