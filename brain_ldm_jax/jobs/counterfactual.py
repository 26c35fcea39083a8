r"""The `counterfactual` job: every subject of a cohort with other covariates, measured.

    python -m brain_ldm_jax.main --config=configs/counterfactual.py --workdir=RUN \
        --config.counterfactual.change="ventricular_volume=+10"

For every subject of a cohort (default: the run's validation split) it writes, under
WORKDIR/counterfactual/ (or counterfactual.out_dir):
    sub-X/sub-X_edited.nii.gz          the subject with the new covariates (MNI grid of the run)
    sub-X/sub-X_reconstruction.nii.gz  inverted and regenerated with its own covariates
    sub-X/sub-X_difference.nii.gz      edited - reconstruction: the change the covariates make
    sub-X/sub-X_counterfactual.png     original, reconstruction, edited, difference (same slices)
    changes.tsv    per subject: covariates from/to, requested vs measured volume changes,
                   reconstruction errors, how much the edit moved each brain region
    summary.json   r and slope of measured vs requested changes, reconstruction vs autoencoder
                   error, region changes; changes_<quantity>.png scatter plots
Measured changes are calibrated volumes (metrics.volumes, calibrated on the run's training
subjects) of the edited brain minus those of the reconstruction, so the autoencoder's own bias
cancels. The programs (DDIM inversion and regeneration) are brain_ldm_jax/counterfactual.py.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from brain_ldm_jax import api
from brain_ldm_jax import charts
from brain_ldm_jax import counterfactual
from brain_ldm_jax import evaluate
from brain_ldm_jax import figures
from brain_ldm_jax import files
from brain_ldm_jax import generate
from brain_ldm_jax.data import manifest
from brain_ldm_jax.data import nifti
from brain_ldm_jax.diffusion import inversion
from brain_ldm_jax.errors import ConfigError, DataError
from brain_ldm_jax.metrics import volumes as volumes_lib


@dataclasses.dataclass(frozen=True)
class Settings:
  """The validated `config.counterfactual` section."""
  run_dir: str
  out_dir: str
  cohort: str | None
  change: str | None
  targets_tsv: str | None
  max_subjects: int | None  # None: all
  num_steps: int | None
  guidance_scale: float | None
  strength: float
  batch_size: int
  calibration_subjects: int
  calibration_path: str | None


def settings_from_config(config, workdir: str) -> Settings:
  c = config.counterfactual
  if bool(c.change) == bool(c.targets_tsv):
    raise ConfigError("give exactly one of counterfactual.change (e.g. 'age=+10') and "
                      "counterfactual.targets_tsv (participant_id + target columns)")
  for field in ("batch_size",):
    if int(c[field]) < 1:
      raise ConfigError(f"counterfactual.{field}={c[field]} must be >= 1")
  for field in ("max_subjects", "calibration_subjects"):
    if c[field] is not None and int(c[field]) < 0:
      raise ConfigError(f"counterfactual.{field}={c[field]} must be >= 0")
  return Settings(run_dir=os.path.abspath(c.run_dir or workdir),
                  out_dir=os.path.abspath(c.out_dir or os.path.join(workdir, "counterfactual")),
                  cohort=c.cohort, change=c.change, targets_tsv=c.targets_tsv,
                  max_subjects=int(c.max_subjects) if c.max_subjects else None,
                  num_steps=int(c.num_steps) if c.num_steps else None,
                  guidance_scale=c.guidance_scale, strength=float(c.strength),
                  batch_size=int(c.batch_size),
                  calibration_subjects=int(c.calibration_subjects),
                  calibration_path=c.calibration_path)


def _cohort_config(run: api.Run, cohort: str):
  """The run's data config pointed at `cohort` (a participants TSV or a BIDS folder)."""
  data = copy.deepcopy(run.config.data)
  if os.path.isdir(cohort):
    data.data_dir, data.participants_tsv = cohort, None
  elif os.path.isfile(cohort):
    data.data_dir, data.participants_tsv = os.path.dirname(os.path.abspath(cohort)), cohort
  else:
    raise DataError(f"counterfactual.cohort={cohort}: no such file or folder (give a "
                    "participants.tsv or a BIDS folder holding one)")
  return data


def load_subjects(run: api.Run, cohort: str) -> tuple[list[manifest.Subject], str]:
  """The subjects to edit and where they come from: `cohort`, else the run's validation split."""
  if cohort:
    return manifest.load_cohort(_cohort_config(run, cohort)), os.path.abspath(cohort)
  data = run.config.data
  _, val = manifest.split_subjects(manifest.load_cohort(data), data.val_fraction, data.split_seed)
  return val, f"validation split of {manifest.tsv_path(data)}"


def _load(path: str, run: api.Run) -> np.ndarray:
  """One image on the run's grid; DataError when it cannot be put there."""
  data = run.config.data
  volume, affine = nifti.load_volume(path, tuple(data.shape), float(data.spacing),
                                     tuple(data.clip_percentiles))
  if not np.allclose(affine, run.affine, atol=1e-3):
    raise DataError(f"{path}: lands on a grid with affine {np.round(affine, 3).tolist()}, not the "
                    f"run's MNI grid {np.round(run.affine, 3).tolist()}; resample it to MNI space "
                    f"at {data.spacing} mm first")
  return volume


def _figure(path: str, sid: str, original, reconstruction, edited, difference, spacing: float,
            change_text: str) -> None:
  """Original, reconstruction, edited on one window; the difference mid-grey at 0 beside them."""
  window = figures.common_window([original], [reconstruction, edited])
  lo, hi = window
  m = max(float(np.percentile(np.abs(difference), 99.9)), 1e-6)
  # The difference drawn in the same window: 0 at mid-grey, ±m at black / white.
  shown = (lo + hi) / 2 + np.clip(difference / m, -1, 1) * (hi - lo) / 2
  figures.save_montage_png(
      [original, reconstruction, edited, shown], path, window=window, spacing=(spacing,) * 3,
      titles=["original", "reconstruction", "edited", f"difference ±{m:.2g}"],
      suptitle=f"{sid}: {change_text}")


def _change_text(names, before, after) -> str:
  parts = [f"{n} {b:g} -> {a:g}" for n, b, a in zip(names, before, after) if a != b]
  return ", ".join(parts) or "no change"


def _write_tsv(path: str, rows: list[dict]) -> None:
  header = list(rows[0])
  lines = ["\t".join(header)]
  for row in rows:
    lines.append("\t".join(f"{row[k]:.6g}" if isinstance(row[k], float) else str(row[k])
                           for k in header))
  files.write_text_atomic(path, "\n".join(lines) + "\n")


def run_counterfactual_job(config, workdir: str) -> dict:
  """`config.job == "counterfactual"`: see the module docstring. Returns the summary."""
  s = settings_from_config(config, workdir)
  run = generate.load_checked_run(s.run_dir)
  names = tuple(run.config.data.covariates)
  options = counterfactual.edit_options(run, num_steps=s.num_steps,
                                        guidance_scale=s.guidance_scale, strength=s.strength)
  subjects, source = load_subjects(run, s.cohort)
  if s.targets_tsv:
    targets = counterfactual.read_targets_tsv(s.targets_tsv, names)
    subjects, cond_from, cond_to = counterfactual.plan_targets(subjects, names, run.stats,
                                                               targets=targets)
  else:
    changes = counterfactual.parse_changes(s.change, names)
    subjects, cond_from, cond_to = counterfactual.plan_targets(
        subjects[:s.max_subjects], names, run.stats, changes=changes)
  if s.targets_tsv and s.max_subjects:
    subjects, cond_from, cond_to = (subjects[:s.max_subjects], cond_from[:s.max_subjects],
                                    cond_to[:s.max_subjects])
  if not subjects:
    raise DataError(f"no subjects to edit in {source}")
  quantities = [q for q in volumes_lib.QUANTITIES if q in names]
  if s.calibration_path:
    calibration = volumes_lib.Calibration.load(s.calibration_path)
  else:
    data = run.config.data
    train, _ = manifest.split_subjects(manifest.load_cohort(data), data.val_fraction,
                                       data.split_seed)
    calibration = evaluate.fit_volume_calibration(
        run, train, quantities, s.calibration_subjects or len(train), seed=0,
        batch_size=s.batch_size)
  logging.info("counterfactuals of %d subjects (%s) from %s: %s, DDIM %d steps, strength %g, "
               "guidance %g", len(subjects), source, s.run_dir,
               s.change or f"targets {s.targets_tsv}", options["num_steps"], options["strength"],
               options["guidance_scale"])

  program = jax.jit(counterfactual.counterfactual_fn(run, **options))
  norm = lambda m: api.normalise_covariates(m, run.stats, names)
  atlas = volumes_lib.atlas_for_grid(tuple(run.config.data.shape), run.affine)
  spacing = float(run.config.data.spacing)
  os.makedirs(s.out_dir, exist_ok=True)
  rows, requested, measured = [], {q: [] for q in quantities}, {q: [] for q in quantities}
  bs = s.batch_size
  for start in range(0, len(subjects), bs):
    batch = subjects[start:start + bs]
    k = len(batch)
    index = np.minimum(np.arange(start, start + bs), len(subjects) - 1)  # pad: one compilation
    images = np.stack([_load(subjects[i].image_path, run) for i in index])
    out = program(run.params, jnp.asarray(images), jnp.asarray(norm(cond_from[index])),
                  jnp.asarray(norm(cond_to[index])))
    out = {name: np.asarray(v)[:k] for name, v in out.items()}
    volumes = {name: volumes_lib.measure(list(out[name]), run.affine, calibration, bs)
               for name in ("reconstruction", "edited")}
    original_volumes = volumes_lib.measure(list(images[:k]), run.affine, calibration, bs)
    for b, subject in enumerate(batch):
      i, sid = start + b, subject.participant_id
      original, recon, edited = images[b], out["reconstruction"][b], out["edited"][b]
      difference = edited - recon
      folder = os.path.join(s.out_dir, sid)
      nifti.save_volume(os.path.join(folder, f"{sid}_edited.nii.gz"), edited, run.affine,
                        mni=True)
      nifti.save_volume(os.path.join(folder, f"{sid}_reconstruction.nii.gz"), recon, run.affine,
                        mni=True)
      nifti.save_volume(os.path.join(folder, f"{sid}_difference.nii.gz"), difference, run.affine,
                        mni=True)
      change_text = _change_text(names, cond_from[i], cond_to[i])
      _figure(os.path.join(folder, f"{sid}_counterfactual.png"), sid, original, recon, edited,
              difference, spacing, change_text)
      row = {"participant_id": sid}
      for j, n in enumerate(names):
        row[f"{n}_from"], row[f"{n}_to"] = float(cond_from[i, j]), float(cond_to[i, j])
      for q in quantities:
        j = names.index(q)
        want = float(cond_to[i, j] - cond_from[i, j])
        got = float(volumes["edited"][q][b] - volumes["reconstruction"][q][b])
        row[f"requested_{q}_change"], row[f"measured_{q}_change"] = want, got
        row[f"measured_{q}_original"] = float(original_volumes[q][b])
        row[f"measured_{q}_reconstruction"] = float(volumes["reconstruction"][q][b])
        row[f"measured_{q}_edited"] = float(volumes["edited"][q][b])
        requested[q].append(want)
        measured[q].append(got)
      row["autoencoder_mae"] = float(np.mean(np.abs(out["autoencoder"][b] - original)))
      row["reconstruction_mae"] = float(np.mean(np.abs(recon - original)))
      for region, value in counterfactual.region_changes(difference, atlas).items():
        row[f"edit_mean_abs_{region}"] = value
      rows.append(row)
    logging.info("counterfactuals: %d/%d subjects", start + k, len(subjects))

  summary = _summary(rows, requested, measured, quantities, s, options, source, run,
                     calibration)
  for q in quantities:
    if np.std(requested[q]) > 0:
      name = f"changes_{q}.png"
      charts.scatter_requested_vs_measured(requested[q], measured[q],
                                            os.path.join(s.out_dir, name),
                                            f"{q.replace('_', ' ')} change", "mL",
                                            title="edit")
      summary["figures"].append(name)
  _write_tsv(os.path.join(s.out_dir, "changes.tsv"), rows)
  if jax.process_index() == 0:  # only process 0 writes shared files
    files.write_json_atomic(os.path.join(s.out_dir, "summary.json"), summary)
  logging.info("counterfactuals written to %s: reconstruction MAE %.4f vs autoencoder %.4f; %s",
               s.out_dir, summary["reconstruction"]["inversion_mae"],
               summary["reconstruction"]["autoencoder_mae"],
               "; ".join(f"{q} change r={v['r']} slope={v['slope']}"
                         for q, v in summary["changes"].items()))
  return summary


def _summary(rows, requested, measured, quantities, s: Settings, options, source, run,
             calibration) -> dict:
  ae = float(np.mean([r["autoencoder_mae"] for r in rows]))
  inv = float(np.mean([r["reconstruction_mae"] for r in rows]))
  return dict(
      run_dir=s.run_dir, cohort=source, num_subjects=len(rows),
      change=s.change or None, targets_tsv=os.path.abspath(s.targets_tsv) if s.targets_tsv
      else None, options=options,
      inverted_to_timestep=int(inversion.edit_timesteps(
          int(run.config.diffusion.num_train_timesteps), options["num_steps"],
          options["strength"], generate.timestep_spacing(run.config, "ddim"))[0]),
      reconstruction=dict(autoencoder_mae=ae, inversion_mae=inv, ratio=inv / ae if ae else None,
                          note="mean |image - original| over the whole grid; inversion: "
                               "inverted and regenerated with the subject's own covariates"),
      changes={q: dict(counterfactual.line_fit(requested[q], measured[q]),
                       note="measured = calibrated volume of the edited brain minus that of "
                            "the reconstruction (mL); requested = target - recorded value")
               for q in quantities},
      # How much of a covariate's spread the decoded brains show at all: a ceiling for the
      # slope of any edit, set by the autoencoder and the measurement, not by the inversion.
      reconstruction_vs_recorded={
          q: counterfactual.line_fit([r[f"{q}_from"] for r in rows],
                      [r[f"measured_{q}_reconstruction"] for r in rows]) for q in quantities},
      regions={region: float(np.mean([r[f"edit_mean_abs_{region}"] for r in rows]))
               for region in counterfactual.REGIONS},
      regions_note=("mean |edited - reconstruction| (image units, [0, 1]) in the template's "
                    "ventricles dilated by %g mm, and in the rest of the brain mask"
                    % volumes_lib.VENTRICLE_MARGIN_MM),
      calibration=calibration.to_json(), figures=[])
