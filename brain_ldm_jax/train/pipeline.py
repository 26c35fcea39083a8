"""The `ldm` job's training stages: cohort -> autoencoder -> latent diffusion (jobs/ldm.py).

Each stage resumes from its latest checkpoint and is skipped when finished, so rerunning the same
command after an interruption continues where it stopped.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from brain_ldm_jax import figures
from brain_ldm_jax import run_dir
from brain_ldm_jax import sharding as sharding_lib
from brain_ldm_jax.data import manifest
from brain_ldm_jax.data import pipeline as data_pipeline
from brain_ldm_jax.data import preflight
from brain_ldm_jax.data import synthetic
from brain_ldm_jax.train import autoencoder as ae_stage
from brain_ldm_jax.train import ldm as ldm_stage
from brain_ldm_jax.train import loop
from brain_ldm_jax.train import perceptual


def prepare_data(config, workdir: str):
  """(train subjects, validation subjects, covariate statistics), the cohort made if needed."""
  data_dir = config.data.data_dir or synthetic.ensure_cohort(config, workdir)
  # Absolute paths: run.json must find the cohort again from any working directory.
  with config.unlocked():
    config.data.data_dir = os.path.abspath(data_dir)
    if config.data.participants_tsv:
      config.data.participants_tsv = os.path.abspath(config.data.participants_tsv)
  # Every problem of the table and the image headers at once, before any training step.
  subjects = preflight.checked_subjects(config.data)
  train, val = manifest.split_subjects(subjects, config.data.val_fraction, config.data.split_seed)
  stats = manifest.CovariateStats.from_subjects(train, config.data.covariates)
  logging.info("cohort %s: %d training and %d validation subjects", config.data.data_dir,
               len(train), len(val))
  return train, val, stats


def _montage_images(volumes: np.ndarray, name: str) -> dict[str, np.ndarray]:
  return {name: figures.montage_array(list(volumes), window=(0.0, 1.0))}


def train_autoencoder(config, workdir, mesh, train, stats, meta):
  t = config.train_ae
  key = jax.random.fold_in(jax.random.key(config.seed), 0)
  perceptual_fn = None
  if t.perceptual_weights_path:
    perceptual_fn = perceptual.make_perceptual_loss(t.perceptual_weights_path)
    logging.info("perceptual loss on: MedicalNet features from %s", t.perceptual_weights_path)
  else:
    logging.info("perceptual loss off: no pretrained feature weights given "
                 "(train_ae.perceptual_weights_path)")
  built = ae_stage.build(config, mesh, key, perceptual_fn)
  loader = data_pipeline.make_train_loader(train, stats, config.data, t.batch_size,
                                           seed=config.seed, mesh=mesh,
                                           field="train_ae.batch_size")
  autoencoder = built["autoencoder"]

  # Computed on the mesh like a step, the result replicated: each process holds the whole
  # (small) result, which a process cannot fetch from an array that spans other processes.
  @functools.partial(jax.jit, out_shardings=sharding_lib.replicated(mesh))
  def inputs_and_reconstructions(params, images):
    real = images[:2]
    return jnp.concatenate([real, ae_stage.reconstruct(autoencoder, params, real)])[..., 0]

  def images(state, batch):
    volumes = np.asarray(inputs_and_reconstructions(state.params, batch["image"]))
    if jax.process_index() != 0:  # only process 0 writes summaries
      return {}
    return _montage_images(volumes, "inputs_then_reconstructions")

  stage = loop.Stage(name="autoencoder", directory=os.path.join(workdir, run_dir.AE_DIR),
                     num_steps=t.num_steps, log_every=t.log_every,
                     checkpoint_every=t.checkpoint_every, image_every=t.image_every,
                     keep_checkpoints=t.keep_checkpoints, init_state=built["init"],
                     abstract_state=built["abstract"], train_step=built["step"], meta=meta,
                     images=images)
  state = loop.run_stage(stage, loader, data_iterator=loader)
  return autoencoder, state.params


def scale_factor_for(config, workdir, autoencoder, ae_params, train, stats, mesh) -> float:
  """The run's latent scale factor, computed once from the first training batch and stored."""
  info = run_dir.read_run_info(workdir)
  if info.get("scale_factor") is not None:
    return float(info["scale_factor"])
  first = next(iter(data_pipeline.make_eval_loader(train, stats, config.data,
                                                   config.train_ldm.batch_size, mesh=mesh)))
  factor = ldm_stage.latent_scale_factor(autoencoder, ae_params, first["image"],
                                         config.train_ldm.scale_factor)
  logging.info("latent scale factor %.5g (%s)", factor, config.train_ldm.scale_factor)
  return factor


def cached_posteriors(config, autoencoder, ae_params, train, stats, mesh) -> dict[str, np.ndarray]:
  """Every training subject's posterior (mean, log-variance) and covariates, encoded once.

  The encoder is frozen during the LDM stage, so encoding each subject once gives exactly the
  latents a per-step encoding would, without re-running the encoder every step.
  """
  loader = data_pipeline.make_eval_loader(train, stats, config.data,
                                          config.train_ldm.batch_size, mesh=mesh)
  encode = jax.jit(functools.partial(autoencoder.apply, method="encode"))
  parts = {"latent_mean": [], "latent_logvar": [], "cond": [], "index": [], "mask": []}
  for batch in loader:
    mean, logvar = encode({"params": ae_params}, batch["image"])
    for name, value in (("latent_mean", mean), ("latent_logvar", logvar), ("cond", batch["cond"]),
                        ("index", batch["index"]), ("mask", batch["mask"])):
      parts[name].append(np.asarray(multihost_utils.process_allgather(value, tiled=True)))
  arrays = {k: np.concatenate(v) for k, v in parts.items()}
  keep = arrays.pop("mask") > 0
  order = np.argsort(arrays.pop("index")[keep], kind="stable")
  logging.info("encoded %d training subjects once for the LDM stage", int(keep.sum()))
  return {k: v[keep][order] for k, v in arrays.items()}


def train_ldm(config, workdir, mesh, train, stats, autoencoder, ae_params, scale_factor, meta):
  t = config.train_ldm
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  built = ldm_stage.build(config, mesh, key)
  if t.cache_latents:
    arrays = cached_posteriors(config, autoencoder, ae_params, train, stats, mesh)
    loader = data_pipeline.make_array_loader(arrays, t.batch_size, seed=config.seed + 1,
                                             mesh=mesh, field="train_ldm.batch_size")
  else:
    loader = data_pipeline.make_train_loader(train, stats, config.data, t.batch_size,
                                             seed=config.seed + 1, mesh=mesh,
                                             field="train_ldm.batch_size")
  scale = jax.device_put(np.float32(scale_factor), sharding_lib.replicated(mesh))
  ae_params = jax.device_put(ae_params, sharding_lib.replicated(mesh))

  def step(state, batch, step_number):
    del step_number
    return built["step"](state, batch, ae_params, scale)

  stage = loop.Stage(name="ldm", directory=os.path.join(workdir, run_dir.LDM_DIR),
                     num_steps=t.num_steps, log_every=t.log_every,
                     checkpoint_every=t.checkpoint_every, image_every=t.image_every,
                     keep_checkpoints=t.keep_checkpoints, init_state=built["init"],
                     abstract_state=built["abstract"], train_step=step, meta=meta)
  return loop.run_stage(stage, loader, data_iterator=loader)
