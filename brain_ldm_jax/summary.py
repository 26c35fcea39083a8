"""How well did a run learn? The `ldm` job's last stages measure it and show it.

The summary (`summarise`, the `summary` stage; one printed block and WORKDIR/summary.json):

1. N requested covariate rows are drawn from the training cohort's joint distribution
   (`covariates.draw_conditions`, the evaluate job's drawing), and N brains generated with the run's
   fast sampler (`sampling.summary_sampler`, `sampling.summary_num_steps`).
2. Their ventricular and brain volumes are measured (metrics.volumes, calibrated on training
   subjects as the evaluate job does): Pearson r and MAE against the requested values.
3. The autoencoder's reconstruction SSIM on the validation brains: every sample is decoded by it,
   so this is the sharpness ceiling of the samples.
4. Mean MS-SSIM over random pairs of generated brains and of real validation brains: blurred or
   collapsed samples read far from the real value.

The samples (`write_samples`, the `samples` stage): brains for the first validation subjects'
covariates, each beside that subject's real brain in samples.png. Both stages sample through
sampling.py, the driver every job shares.

The sweeps (`write_sweeps`, part of the `samples` stage): one noise, one covariate over its
training range, the other covariates at the training subjects' medians, as NIfTI and one PNG per
covariate (rows = values, the same slices), so a person sees what the model ties to each covariate.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from brain_ldm_jax import api
from brain_ldm_jax import covariates
from brain_ldm_jax import evaluate
from brain_ldm_jax import figures
from brain_ldm_jax import files
from brain_ldm_jax import networks
from brain_ldm_jax import sampling as sampling_lib
from brain_ldm_jax.data import manifest
from brain_ldm_jax.data import nifti
from brain_ldm_jax.metrics import ssim as ssim_lib
from brain_ldm_jax.metrics import volumes as volumes_lib
from brain_ldm_jax.nn import autoencoder as autoencoder_lib

SUMMARY_FILE = "summary.json"
SAMPLES_DIR = "samples"  # in the workdir: the samples stage's NIfTI and PNGs
KEYS = ("ventricular_volume_r", "brain_volume_r", "ventricular_volume_mae_ml",
        "brain_volume_mae_ml", "num_samples", "ae_val_ssim", "msssim_generated_pairs",
        "msssim_real_pairs", "seconds_total")
MAX_PAIRS = 200
BATCH_SIZE = 8
UNITS = {"age": "y", "ventricular_volume": "mL", "brain_volume": "mL"}


# ----------------------------------------------------------------------------- measurements


def volume_fidelity(requested: np.ndarray, measured: np.ndarray) -> dict:
  """r and MAE (mL) of measured vs requested; r is None, with the reason, when undefined."""
  fit = volumes_lib.fidelity(requested, measured)
  out = dict(r=fit["r"] if np.isfinite(fit["r"]) else None, mae=fit["mae"])
  if out["r"] is None:
    out["note"] = (f"r undefined: {'measured' if np.std(measured) == 0 else 'requested'} "
                   "values are constant")
  return out


def reconstruction_ssim(run: api.Run, volumes: np.ndarray) -> float:
  """Mean SSIM of the autoencoder's reconstructions (through the posterior mean) of `volumes`."""
  autoencoder = autoencoder_lib.build_autoencoder(run.config.autoencoder)

  @jax.jit
  def ssim_of_reconstruction(params, x):
    mean, _ = autoencoder.apply({"params": params}, x[..., None], method="encode")
    recon = networks.as_image(autoencoder.apply({"params": params}, mean, method="decode"))
    return ssim_lib.ssim(x, recon[..., 0], spatial_dims=3)

  scores = [np.asarray(ssim_of_reconstruction(run.params["autoencoder"], jnp.asarray(v[None])))
            for v in volumes]  # one at a time: one compilation, little memory
  return float(np.mean(np.concatenate(scores)))


def pair_msssim(volumes: np.ndarray, seed: int) -> float | None:
  """Mean MS-SSIM over up to MAX_PAIRS random distinct pairs; None for fewer than 2 volumes."""
  available = len(volumes) * (len(volumes) - 1) // 2
  if available < 1:
    return None
  metric = ssim_lib.default_ms_ssim(tuple(np.shape(volumes[0])))
  return ssim_lib.pairwise_diversity(volumes, jax.random.key(seed), min(MAX_PAIRS, available),
                                     metric, BATCH_SIZE)


def summarise(run: api.Run, train: Sequence[manifest.Subject], val: Sequence[manifest.Subject],
              sampling, seconds_before: float = 0.0) -> dict:
  """The summary's numbers (KEYS and their context) for a trained run.

  `sampling` is the job's `config.sampling`; `seconds_before` the job's time spent before this
  call (added to this call's own time for `seconds_total`).
  """
  start = time.monotonic()
  names = list(run.config.data.covariates)
  n = int(sampling.summary_samples)
  cond, _ = covariates.draw_conditions(train, names, n, int(sampling.seed))
  options = api.sampling_options(run, sampler=sampling.summary_sampler,
                                 num_steps=int(sampling.summary_num_steps))
  logging.info("summary: %d brains with %s-%d for covariates drawn from %d training subjects", n,
               options["sampler"], options["num_steps"], len(train))
  sample = sampling_lib.make_volume_sampler(run, options, batch_size=min(BATCH_SIZE, n))
  generated = sample(run.params, jax.random.key(int(sampling.seed)), cond)

  out = dict(num_samples=n, sampler=options["sampler"], num_steps=options["num_steps"],
             notes=[])
  quantities = [q for q in volumes_lib.QUANTITIES if q in names]
  if quantities:
    calibration = evaluate.fit_volume_calibration(
        run, train, quantities, int(sampling.summary_calibration_subjects), int(sampling.seed),
        BATCH_SIZE)
    measured = volumes_lib.measure(generated, run.affine, calibration, BATCH_SIZE)
  for q in volumes_lib.QUANTITIES:
    if q not in quantities:
      out[f"{q}_r"] = out[f"{q}_mae_ml"] = None
      out["notes"].append(f"{q}: not a covariate of this run")
      continue
    fit = volume_fidelity(cond[:, names.index(q)], measured[q])
    out[f"{q}_r"], out[f"{q}_mae_ml"] = fit["r"], fit["mae"]
    if "note" in fit:
      out["notes"].append(f"{q}: {fit['note']}")

  # Real brains: the validation split, or the training split when it holds fewer than 2.
  real_subjects, real_set = (val, "validation") if len(val) >= 2 else (train, "training")
  real = evaluate.subject_volumes(real_subjects, run.config.data)
  out["ae_val_ssim"] = reconstruction_ssim(run, real)
  out["msssim_generated_pairs"] = pair_msssim(generated, int(sampling.seed))
  out["msssim_real_pairs"] = pair_msssim(real, int(sampling.seed))
  out.update(real_set=real_set, num_real=len(real))
  out["seconds_total"] = seconds_before + time.monotonic() - start
  return out


def format_block(summary: Mapping) -> str:
  """The summary as the few lines the job prints."""
  def num(v, fmt):
    return "undefined" if v is None else format(v, fmt)

  lines = [f"summary: {summary['num_samples']} generated brains "
           f"({summary['sampler']}-{summary['num_steps']}), covariates drawn from the training "
           "cohort; requested vs measured volume"]
  for q in volumes_lib.QUANTITIES:
    lines.append(f"  {q.replace('_', ' '):<20} r = {num(summary[f'{q}_r'], '.3f')}   "
                 f"MAE = {num(summary[f'{q}_mae_ml'], '.1f')} mL")
  lines.append(f"  autoencoder reconstruction SSIM ({summary['real_set']}) = "
               f"{summary['ae_val_ssim']:.3f}")
  lines.append(f"  MS-SSIM of pairs: generated {num(summary['msssim_generated_pairs'], '.3f')}, "
               f"real {num(summary['msssim_real_pairs'], '.3f')}")
  lines.append(f"  {summary['seconds_total']:.0f} s total")
  lines += [f"  note: {note}" for note in summary["notes"]]
  return "\n".join(lines)


def write_summary(workdir: str, summary: Mapping) -> str:
  path = os.path.join(workdir, SUMMARY_FILE)
  files.write_json_atomic(path, dict(summary))
  return path


# ----------------------------------------------------------------------------- samples


def write_samples(run: api.Run, val, train, out_dir: str, sampling) -> list[str]:
  """Samples for the first validation subjects' covariates, as NIfTI and one PNG beside those
  subjects' real brains (same slices and window), then the covariate sweeps."""
  names = tuple(run.config.data.covariates)
  subjects = val[:sampling.num_samples]
  cond = np.array([[s.covariates[n] for n in names] for s in subjects])
  # Batch 1 (the device count): the sweeps' calls, one brain each, reuse the same program.
  sample = sampling_lib.make_volume_sampler(run, api.sampling_options(run))
  volumes = sample(run.params, jax.random.key(sampling.seed), cond)
  write_sweeps(run, sample, train, out_dir, sampling)
  if jax.process_index() != 0:
    return []
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for i, volume in enumerate(volumes):
    path = os.path.join(out_dir, f"sample-{i:03d}.nii.gz")
    nifti.save_volume(path, volume, run.affine)
    paths.append(path)
  real = evaluate.subject_volumes(subjects, run.config.data)
  columns = [v for pair in zip(real, volumes) for v in pair]
  titles = [t for s, row in zip(subjects, cond)
            for t in (f"real {s.participant_id}", figures.sample_title(dict(zip(names, row))))]
  figures.save_montage_png(columns, os.path.join(out_dir, "samples.png"), titles=titles,
                           window=figures.common_window(list(real), list(volumes)),
                           suptitle="real validation brains, each beside a sample generated for "
                                    "its covariates")
  logging.info("wrote %d samples and samples.png to %s", len(paths), out_dir)
  return paths


# ----------------------------------------------------------------------------- sweeps


def typical_covariates(subjects: Sequence[manifest.Subject], names: Sequence[str]) -> dict:
  """Each covariate's median over the subjects; for a two-valued one (sex) its commoner value."""
  out = {}
  for n in names:
    column = np.array([s.covariates[n] for s in subjects], np.float64)
    levels, counts = np.unique(column, return_counts=True)
    out[n] = float(levels[np.argmax(counts)]) if len(levels) <= 2 else float(np.median(column))
  return out


def sweep_values(stats: manifest.CovariateStats, name: str, count: int) -> np.ndarray:
  """`count` evenly spaced values over the covariate's training range."""
  j = stats.names.index(name)
  return np.linspace(stats.minimum[j], stats.maximum[j], int(count))


def value_label(name: str, value: float, with_name: bool = True) -> str:
  if name == "sex":
    return "sex M" if value >= 0.5 else "sex F"
  unit = UNITS.get(name, "")
  text = f"{value:.0f}{' ' + unit if unit else ''}"
  return f"{name.replace('_', ' ')} {text}" if with_name else text


def write_sweeps(run: api.Run, sample, train: Sequence[manifest.Subject], out_dir: str,
                 sampling) -> list[str]:
  """`sweep_<covariate>.png` and `sweep_<covariate>/*.nii.gz` for each of the run's covariates
  named in `sampling.sweep_covariates`.

  `sample` is the run's `api.make_sampler` or `sampling.make_volume_sampler` function. Returns
  the PNG paths (process 0 writes).
  """
  names = tuple(run.config.data.covariates)
  fixed = typical_covariates(train, names)
  key = jax.random.key(int(sampling.seed))
  paths = []
  skipped = [n for n in sampling.sweep_covariates if n not in names]
  if skipped:
    logging.info("no sweep of %s: not a covariate of this run (%s)", ", ".join(skipped),
                 ", ".join(names))
  for name in (n for n in sampling.sweep_covariates if n in names):
    values = sweep_values(run.stats, name, sampling.sweep_values)
    volumes = api.sweep(sample, run.params, key, fixed, name, values)
    if jax.process_index() != 0:
      continue
    folder = os.path.join(out_dir, f"sweep_{name}")
    os.makedirs(folder, exist_ok=True)
    for v, volume in zip(values, volumes):
      nifti.save_volume(os.path.join(folder, f"{name}_{v:.1f}.nii.gz"), volume, run.affine)
    others = ", ".join(value_label(n, fixed[n]) for n in names if n != name)
    path = os.path.join(out_dir, f"sweep_{name}.png")
    title = f"{name.replace('_', ' ')} swept, one noise\n{others}"
    labels = [value_label(name, v, with_name=False) for v in values]
    figures.save_rows_png(list(volumes), path, labels, window=(0.0, 1.0), suptitle=title)
    paths.append(path)
  if paths:
    logging.info("wrote %d covariate sweeps to %s", len(paths), out_dir)
  return paths


__all__ = ["KEYS", "SAMPLES_DIR", "SUMMARY_FILE", "format_block", "summarise", "sweep_values",
           "typical_covariates", "volume_fidelity", "write_samples", "write_summary",
           "write_sweeps"]
