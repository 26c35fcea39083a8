"""The `check_data` job: the pre-flight (data/preflight.py) on its own, as a printed report."""

from __future__ import annotations

import time

from brain_ldm_jax.data import manifest
from brain_ldm_jax.data import preflight
from brain_ldm_jax.errors import DataError


def run_check_data_job(config, workdir: str) -> manifest.Cohort:
  """Prints the pre-flight's report; DataError (non-zero exit) on problems unless
  `data.skip_bad_subjects` (then the report says who training would leave out)."""
  del workdir  # the check itself writes no files
  start = time.monotonic()
  cohort = preflight.check_cohort(config.data)
  seconds = time.monotonic() - start
  summary = (f"{cohort.tsv}: {cohort.num_subjects} subjects, table and image headers checked in "
             f"{seconds:.1f} s")
  if not cohort.problems:
    print(f"{summary}: no problems")
    return cohort
  if not config.data.skip_bad_subjects:
    raise DataError(f"{summary}\n{cohort.report()}")
  print(f"{summary}\n{cohort.report()}\ndata.skip_bad_subjects=True: training would use the "
        f"other {len(cohort.good_subjects())} subjects")
  return cohort
