"""The `ldm` job: cohort -> autoencoder -> latent diffusion -> samples and sweeps -> summary.

Each stage resumes from its latest checkpoint and is skipped when finished, so rerunning the same
command after an interruption continues where it stopped. The training stages are in
train/pipeline.py, the samples and summary stages in summary.py.
"""

from __future__ import annotations

import os
import time

import jax
from absl import logging

from brain_ldm_jax import files
from brain_ldm_jax import run_dir
from brain_ldm_jax import sharding as sharding_lib
from brain_ldm_jax import summary as summary_lib
from brain_ldm_jax.data import nifti
from brain_ldm_jax.errors import ConfigError
from brain_ldm_jax.train import loop
from brain_ldm_jax.train import pipeline

STAGES = ("autoencoder", "ldm", "samples", "summary")


def run_ldm_job(config, workdir: str) -> None:
  """Runs `config.stages` in order; a preempted training stage ends the job cleanly."""
  started = time.monotonic()
  unknown = [s for s in config.stages if s not in STAGES]
  if unknown:
    raise ConfigError(f"config.stages has unknown {unknown}; stages are {', '.join(STAGES)}")
  mesh = sharding_lib.make_mesh(config.mesh)
  train, val, stats = pipeline.prepare_data(config, workdir)
  affine = nifti.mni_affine(tuple(config.data.shape), config.data.spacing)
  run_path = os.path.join(workdir, run_dir.RUN_FILE)
  if not os.path.exists(run_path) and jax.process_index() == 0:
    files.write_json_atomic(run_path, run_dir.run_info(config, stats, None, affine))
  meta = dict(config=config.to_json_best_effort(), covariate_stats=stats.to_json())

  try:
    if "autoencoder" in config.stages or "ldm" in config.stages:
      autoencoder, ae_params = pipeline.train_autoencoder(config, workdir, mesh, train, stats,
                                                          meta)
    if "ldm" in config.stages:
      scale_factor = pipeline.scale_factor_for(config, workdir, autoencoder, ae_params, train,
                                               stats, mesh)
      if jax.process_index() == 0:
        files.write_json_atomic(run_path, run_dir.run_info(config, stats, scale_factor, affine))
      pipeline.train_ldm(config, workdir, mesh, train, stats, autoencoder, ae_params,
                         scale_factor, dict(meta, scale_factor=scale_factor))
  except loop.Preempted as e:
    logging.warning("%s", e)
    return
  if "samples" in config.stages:
    run = run_dir.load_run(workdir)
    summary_lib.write_samples(run, val or train, train,
                              os.path.join(workdir, summary_lib.SAMPLES_DIR), config.sampling)
  if "summary" in config.stages:
    run = run_dir.load_run(workdir)
    numbers = summary_lib.summarise(run, train, val, config.sampling,
                                    seconds_before=time.monotonic() - started)
    if jax.process_index() == 0:
      print(summary_lib.format_block(numbers), flush=True)
      summary_lib.write_summary(workdir, numbers)
  logging.info("done: %s (TensorBoard: tensorboard --logdir %s)", workdir, workdir)
