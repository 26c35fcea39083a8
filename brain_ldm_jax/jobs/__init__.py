"""The jobs `main` runs: `config.job` names one, and each is a function `(config, workdir)`.

One module per job holds its driver only (read the config section, call library code, log and
write what the job promises); what a notebook would call stays in the library modules.
"""

from __future__ import annotations

import importlib

from brain_ldm_jax.errors import UserError

# job name -> "module:function(config, workdir)". Imported on demand: a job's module pulls in
# what only that job needs (orbax, nilearn, matplotlib, ...).
JOBS = {
    "cohort": "brain_ldm_jax.jobs.cohort:run_cohort_job",
    "ldm": "brain_ldm_jax.jobs.ldm:run_ldm_job",
    "generate": "brain_ldm_jax.jobs.generate:run_generate_job",
    "evaluate": "brain_ldm_jax.jobs.evaluate:run_evaluate_job",
    "reader_study": "brain_ldm_jax.jobs.reader_study:run_reader_study_job",
    "counterfactual": "brain_ldm_jax.jobs.counterfactual:run_counterfactual_job",
    "check_data": "brain_ldm_jax.jobs.check_data:run_check_data_job",
}


class UsageError(UserError):
  """A mistake in how the job was called."""


def resolve_job(name: str):
  """The function that runs job `name`, or a UsageError saying what exists."""
  if name not in JOBS:
    raise UsageError(f"config.job={name!r} is not a job; jobs: {', '.join(sorted(JOBS))}")
  module_name, function_name = JOBS[name].split(":")
  return getattr(importlib.import_module(module_name), function_name)
