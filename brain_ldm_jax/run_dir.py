"""A run directory: what a trained run leaves behind, and reading and writing it.

    WORKDIR/run.json        config, covariate statistics, latent scale factor, MNI affine
    WORKDIR/autoencoder/    orbax checkpoints of the autoencoder stage (train/checkpoint.py)
    WORKDIR/ldm/            orbax checkpoints of the latent diffusion stage (EMA weights too)

The training job writes it (jobs/ldm.py), sampling reads it (`load_run`); `save_run` makes one
from weights that were not trained here (converted MONAI weights, random weights in tests).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from brain_ldm_jax import files
from brain_ldm_jax.data import manifest
from brain_ldm_jax.errors import DataError
from brain_ldm_jax.train import checkpoint as checkpoint_lib

RUN_FILE = "run.json"
AE_DIR = "autoencoder"
LDM_DIR = "ldm"


@dataclasses.dataclass(frozen=True)
class Run:
  """What sampling needs from a trained run."""
  config: ml_collections.ConfigDict
  params: dict  # {"autoencoder": ..., "unet": ...}; the UNet's EMA weights
  stats: manifest.CovariateStats
  scale_factor: float
  affine: np.ndarray  # voxel -> MNI mm of the generated grid
  checkpoint: str  # where the weights came from, for provenance


def run_info(config, stats, scale_factor: float | None, affine) -> dict:
  """The run.json content: everything beyond weights that a later job needs."""
  return dict(config=json.loads(config.to_json_best_effort()), covariate_stats=stats.to_json(),
              scale_factor=scale_factor, affine=np.asarray(affine).tolist())


def read_run_info(workdir: str) -> dict:
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.exists(path):
    raise DataError(f"{path} not found: {workdir} is not a trained run "
                    "(train one with --config=configs/ldm.py --workdir=...)")
  with open(path) as f:
    info = json.load(f)
  _drop_retired_fields(info.get("config", {}))
  return info


def _drop_retired_fields(config: dict) -> None:
  """Runs saved before the CPU kernels were chosen per process carry a per-network `conv_impl`."""
  for section in ("autoencoder", "unet", "discriminator"):
    if isinstance(config.get(section), dict):
      config[section].pop("conv_impl", None)


def load_run(workdir: str, *, use_ema: bool = True, ldm_step: int | None = None) -> Run:
  """The autoencoder and LDM weights of a run directory, with its statistics and config.

  Reads only what sampling needs: the autoencoder's parameters and the UNet's EMA (or raw)
  parameters, never the optimizer moments. Each checkpoint is verified against its digests; a
  damaged newest step falls back to the newest intact one with a warning. `ldm_step` asks for one
  LDM step by number instead (a DataError naming it when it is damaged).
  """
  info = read_run_info(workdir)
  if info.get("scale_factor") is None:
    raise DataError(f"{workdir}: the latent diffusion stage has not started; nothing to sample")
  config = ml_collections.ConfigDict(info["config"])
  params = {}
  for name, directory, key, step in (
      ("autoencoder", AE_DIR, "params", None),
      ("unet", LDM_DIR, "ema_params" if use_ema else "params", ldm_step)):
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, directory))
    try:
      _, tree = ckpt.restore_subtree(key, step)
    finally:
      ckpt.close()
    params[name] = jax.tree.map(jnp.asarray, tree)
  return Run(config=config, params=params,
             stats=manifest.CovariateStats.from_json(info["covariate_stats"]),
             scale_factor=float(info["scale_factor"]), affine=np.asarray(info["affine"]),
             checkpoint=os.path.abspath(workdir))


def save_run(workdir: str, config, params: dict, stats: manifest.CovariateStats,
             scale_factor: float, affine) -> None:
  """Writes a sampling-ready run from weights (converted MONAI weights, or untrained for tests).

  The weights are stored as finished stage checkpoints (at the configured step counts), so the
  `ldm` job treats the run as trained and `load_run` reads it like any other.
  """
  os.makedirs(workdir, exist_ok=True)
  for directory, state, step in (
      (AE_DIR, {"params": params["autoencoder"]}, config.train_ae.num_steps),
      (LDM_DIR, {"params": params["unet"], "ema_params": params["unet"]},
       config.train_ldm.num_steps)):
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, directory), asynchronous=False)
    try:
      ckpt.save(step, state, dict(converted=True))
    finally:
      ckpt.close()
  if jax.process_index() == 0:
    files.write_json_atomic(os.path.join(workdir, RUN_FILE),
                            run_info(config, stats, scale_factor, affine))
