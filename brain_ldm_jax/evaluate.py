"""What the `evaluate` job measures: diversity, FID, conditioning fidelity, memorisation.

1. Covariates of N samples are drawn (with a seeded RNG) from the run's training cohort's joint
   distribution (`covariates.draw_conditions`: whole subject rows, jittered), so the requested
   values span the training range, and N brains are generated (`sampling.make_volume_sampler`)
   or read (`read_samples`).
2. Diversity: mean MS-SSIM and 4-G-R-SSIM over random distinct pairs, of the generated set and of
   the real validation set (the paper: closer to the real value is better).
3. FID with MedicalNet (Med3D) features when weights are given; refused with the metrics module's
   message otherwise, unless an alternative extractor is named (reported under its name).
4. Conditioning fidelity: ventricular and brain volume measured (metrics.volumes, calibrated on
   training subjects against their covariate values) vs requested: Pearson r and MAE; the same for
   real validation subjects (the measurement's own ceiling).
5. Memorisation audit (metrics.memorisation): nearest training subject of every generated brain vs
   real-vs-real nearest neighbours, near-copies flagged.

The job that runs them and writes the report is jobs/evaluate.py; the ldm job's summary stage and
the counterfactual job reuse the real volumes and the volume calibration.
"""

from __future__ import annotations

import csv
import functools
import glob
import os

import jax
import numpy as np
from absl import logging

from brain_ldm_jax import api
from brain_ldm_jax import files
from brain_ldm_jax.data import manifest
from brain_ldm_jax.data import nifti
from brain_ldm_jax.errors import ConfigError, DataError
from brain_ldm_jax.metrics import fid as fid_lib
from brain_ldm_jax.metrics import gr_ssim
from brain_ldm_jax.metrics import med3d
from brain_ldm_jax.metrics import memorisation
from brain_ldm_jax.metrics import ssim as ssim_lib
from brain_ldm_jax.metrics import volumes as volumes_lib

# Pinaya et al. 2022, Table 1 and the conditioning check.
PAPER_METRICS = {
    "LDM": dict(fid=0.0076, ms_ssim=0.6555, four_g_r_ssim=0.3883),
    "LDM+DDIM": dict(fid=0.0080, ms_ssim=0.6704, four_g_r_ssim=0.3957),
    "real": dict(fid=0.0005, ms_ssim=0.6536, four_g_r_ssim=0.3909),
}
PAPER_FIDELITY = {"ventricular_volume": dict(r=0.972, how="SynthSeg on 1000 samples"),
                  "age": dict(r=0.692, how="brain-age CNN")}
CONDITIONS_TSV = "conditions.tsv"  # beside generated samples: each file's requested covariates


class LazyVolumes:
  """Integer-indexable list of subjects' preprocessed volumes, loaded on access (small LRU)."""

  def __init__(self, paths, data_config):
    self.paths = list(paths)
    self.load = functools.lru_cache(maxsize=64)(
        lambda i: nifti.load_volume(self.paths[i], tuple(data_config.shape),
                                    float(data_config.spacing),
                                    tuple(data_config.clip_percentiles),
                                    assume_mni=bool(data_config.get("assume_mni", False)))[0])

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    return self.load(int(i))


def _all(volumes) -> np.ndarray:
  return np.stack([np.asarray(volumes[i]) for i in range(len(volumes))])


# ----------------------------------------------------------------------------- samples


def subject_volumes(subjects, data_config) -> np.ndarray:
  """The subjects' preprocessed volumes (N, X, Y, Z) on the run's grid."""
  return _all(LazyVolumes([s.image_path for s in subjects], data_config))


def fit_volume_calibration(run: api.Run, train, quantities, num_subjects: int, seed: int,
                           batch_size: int) -> volumes_lib.Calibration:
  """metrics.volumes' linear calibration on `num_subjects` training subjects picked by `seed`."""
  rng = np.random.default_rng(seed)
  k = min(len(train), int(num_subjects))
  picked = [train[i] for i in sorted(rng.choice(len(train), k, replace=False))]
  logging.info("calibrating volume measurements on %d training subjects", k)
  raw = volumes_lib.raw_measurements(LazyVolumes([s.image_path for s in picked], run.config.data),
                                     run.affine, batch_size)
  truth = {q: np.array([s.covariates[q] for s in picked]) for q in quantities}
  return volumes_lib.fit_calibration(
      raw, truth, dict(source="training split of the run's cohort",
                       participants_tsv=manifest.tsv_path(run.config.data),
                       subjects=[s.participant_id for s in picked],
                       grid=dict(shape=list(run.config.data.shape),
                                 spacing=float(run.config.data.spacing))), quantities)


def write_samples(out_dir: str, volumes: np.ndarray, cond: np.ndarray, names, source_ids,
                  affine) -> None:
  os.makedirs(out_dir, exist_ok=True)
  rows = ["\t".join(("file", *names, "covariates_from"))]
  for i, (v, c, sid) in enumerate(zip(volumes, cond, source_ids)):
    name = f"sample-{i:04d}.nii.gz"
    nifti.save_volume(os.path.join(out_dir, name), v, affine)
    rows.append("\t".join((name, *(f"{x:.6g}" for x in c), sid)))
  files.write_text_atomic(os.path.join(out_dir, CONDITIONS_TSV), "\n".join(rows) + "\n")


def read_samples(samples_dir: str, names, data_config):
  """(volumes, covariates (N, n) or None, ids) of existing NIfTI samples.

  Requested covariates come from samples_dir/conditions.tsv (columns `file` and the run's
  covariate names, as this job writes it); without it conditioning fidelity is skipped.
  """
  tsv = os.path.join(samples_dir, CONDITIONS_TSV)
  if os.path.exists(tsv):
    with open(tsv, newline="") as f:
      rows = list(csv.DictReader(f, delimiter="\t"))
    missing = [c for c in ("file", *names) if rows and c not in rows[0]]
    if missing or not rows:
      raise DataError(f"{tsv}: needs columns file, {', '.join(names)} and one row per sample")
    paths = [os.path.join(samples_dir, r["file"]) for r in rows]
    cond = np.array([[float(r[n]) for n in names] for r in rows])
  else:
    paths = sorted(glob.glob(os.path.join(samples_dir, "*.nii*")))
    cond = None
  if len(paths) < 2:
    raise DataError(f"samples_dir={samples_dir}: needs at least 2 NIfTI samples, found "
                    f"{len(paths)}")
  # Samples are already on the model grid; load_volume keeps them there (and rescales robustly).
  vols = _all(LazyVolumes(paths, data_config))
  return vols, cond, [os.path.basename(p) for p in paths]


# ----------------------------------------------------------------------------- metrics


def diversity(generated, real, num_pairs: int, seed: int, batch_size: int) -> dict:
  """Mean MS-SSIM and 4-G-R-SSIM over random distinct pairs of each set (same pair count)."""
  shape = tuple(np.shape(generated[0]))
  metrics = {"ms_ssim": ssim_lib.default_ms_ssim(shape),
             "four_g_r_ssim": functools.partial(gr_ssim.four_g_r_ssim, spatial_dims=3)}
  out = {}
  for set_name, vols in (("generated", generated), ("real", real)):
    available = len(vols) * (len(vols) - 1) // 2
    pairs = min(int(num_pairs), available)
    row = dict(num_volumes=len(vols), num_pairs=pairs)
    for i, (name, fn) in enumerate(metrics.items()):
      if pairs < 1:
        row[name] = None
        continue
      key = jax.random.fold_in(jax.random.key(seed), i)
      row[name] = ssim_lib.pairwise_diversity(vols, key, pairs, fn, batch_size)
    out[set_name] = row
  out["ms_ssim_scales"] = len(ssim_lib.ms_ssim_weights_for(shape))
  return out


def fid_extractor(e, autoencoder, ae_params) -> fid_lib.FeatureExtractor:
  """Med3D (weights required: the metrics module's message otherwise) or a named alternative."""
  if e.fid_extractor == "med3d":
    return med3d.med3d_extractor(e.fid_weights_path or None, e.fid_depth or None,
                                 batch_size=int(e.batch_size),
                                 field="config.evaluate.fid_weights_path")
  if e.fid_extractor == "autoencoder_latent":
    # Posterior means average-pooled to a 4x4x4 grid per channel: a few hundred features, so the
    # Frechet distance's covariance stays small (the full latent has 10^4 - 10^5 entries).
    @jax.jit
    def pooled(v):
      mean, _ = autoencoder.apply({"params": ae_params}, v[..., None], method="encode")
      b, c = mean.shape[0], mean.shape[-1]
      grid = [max(1, n // 4) for n in mean.shape[1:4]]
      cropped = mean[:, :grid[0] * 4, :grid[1] * 4, :grid[2] * 4]
      blocks = cropped.reshape(b, 4, grid[0], 4, grid[1], 4, grid[2], c)
      return blocks.mean(axis=(2, 4, 6)).reshape(b, -1)

    return fid_lib.FeatureExtractor(
        name=("autoencoder_latent_mean_pool4 (this run's encoder, posterior mean pooled to 4x4x4; "
              "NOT Med3D, not comparable to the paper)"),
        fn=lambda v: np.asarray(pooled(jax.numpy.asarray(v))), batch_size=int(e.batch_size))
  raise ConfigError(f"config.evaluate.fid_extractor={e.fid_extractor!r}: use 'med3d', "
                    "'autoencoder_latent' or 'none'")


def compute_fid(e, real, generated, autoencoder, ae_params) -> dict:
  if e.fid_extractor == "none":
    return dict(value=None, refused="config.evaluate.fid_extractor='none'")
  try:
    extractor = fid_extractor(e, autoencoder, ae_params)
  except ConfigError as err:  # no weights: say so in the report, keep the other metrics
    logging.warning("FID refused: %s", err)
    return dict(value=None, refused=str(err))
  logging.info("FID features with %s", extractor.name)
  result = fid_lib.compute_fid(real, generated, extractor)
  return dict(value=result.value, extractor=result.extractor, num_real=result.num_real,
              num_generated=result.num_generated)


def conditioning(run, e, train, real, real_subjects, generated, cond, names) -> dict:
  """Calibrated volume measurements vs requested (generated) and vs recorded (real)."""
  affine = run.affine
  quantities = [q for q in volumes_lib.QUANTITIES if q in names]
  if not quantities:
    return dict(skipped=f"the run conditions on {names}, none of {volumes_lib.QUANTITIES}")
  if e.calibration_path:
    calibration = volumes_lib.Calibration.load(e.calibration_path)
  else:
    calibration = fit_volume_calibration(run, train, quantities, int(e.calibration_subjects),
                                         e.seed + 1, int(e.batch_size))
  out = dict(calibration=calibration.to_json(), quantities={})
  measured_real = volumes_lib.measure(real, affine, calibration, int(e.batch_size))
  measured_gen = volumes_lib.measure(generated, affine, calibration, int(e.batch_size))
  for q in quantities:
    recorded = np.array([s.covariates[q] for s in real_subjects])
    row = dict(real=volumes_lib.fidelity(recorded, measured_real[q]),
               real_values=dict(recorded=recorded.tolist(), measured=measured_real[q].tolist()))
    if cond is not None:
      requested = cond[:, names.index(q)]
      row["generated"] = volumes_lib.fidelity(requested, measured_gen[q])
      row["generated_values"] = dict(requested=requested.tolist(),
                                     measured=measured_gen[q].tolist())
    else:
      row["generated"] = dict(skipped="no requested covariates (samples_dir without "
                                      f"{CONDITIONS_TSV})")
    if q in PAPER_FIDELITY:
      row["paper"] = PAPER_FIDELITY[q]
    out["quantities"][q] = row
  out["note"] = ("r and MAE: measured (metrics.volumes, linear calibration on training subjects) "
                 "vs requested for generated brains, vs the participants.tsv value for real "
                 "validation brains (the measurement's ceiling).")
  return out


def memorisation_audit(e, autoencoder, ae_params, train_subjects, train_vols, real, generated):
  feats = lambda v: memorisation.latent_features(autoencoder, ae_params, v, int(e.batch_size))
  logging.info("memorisation: encoding %d training, %d real, %d generated brains",
               len(train_vols), len(real), len(generated))
  f_train, f_real, f_gen = feats(train_vols), feats(real), feats(generated)
  nn_gen = memorisation.find_neighbours(f_gen, f_train, generated, train_vols,
                                        int(e.ssim_candidates), int(e.batch_size))
  nn_real = memorisation.find_neighbours(f_real, f_train, real, train_vols,
                                         int(e.ssim_candidates), int(e.batch_size))
  report = memorisation.audit(nn_gen, nn_real, float(e.flag_percentile),
                              [s.participant_id for s in train_subjects])
  report["ssim_candidates"] = int(e.ssim_candidates)
  return report, nn_gen, nn_real
