"""The `evaluate` job: how good, diverse, faithful and original are a trained run's brains?

    python -m brain_ldm_jax.main --config=configs/evaluate.py --workdir=DIR \
        --config.evaluate.run_dir=RUN

1. Covariates of N samples are drawn (with a seeded RNG) from the run's training cohort's joint
   distribution (`draw_conditions`: whole subject rows, jittered), so the requested values span
   the training range, and N brains are generated (or read from samples_dir).
2. Diversity: mean MS-SSIM and 4-G-R-SSIM over random distinct pairs, of the generated set and of
   the real validation set (the paper: closer to the real value is better).
3. FID with MedicalNet (Med3D) features when weights are given; refused with the metrics module's
   message otherwise, unless an alternative extractor is named (reported under its name).
4. Conditioning fidelity: ventricular and brain volume measured (metrics.volumes, calibrated on
   training subjects against their covariate values) vs requested: Pearson r and MAE; the same for
   real validation subjects (the measurement's own ceiling).
5. Memorisation audit (metrics.memorisation): nearest training subject of every generated brain vs
   real-vs-real nearest neighbours, near-copies flagged.

Writes report.json, report.html (self-contained, figures inline) and the PNGs beside it; only
process 0 writes.
"""

from __future__ import annotations

import base64
import csv
import functools
import glob
import html
import json
import os
import time

import jax
import numpy as np
from absl import logging

from brain_ldm_jax import api
from brain_ldm_jax import figures
from brain_ldm_jax.data import manifest
from brain_ldm_jax.data import nifti
from brain_ldm_jax.errors import ConfigError, DataError, UserError
from brain_ldm_jax.metrics import fid as fid_lib
from brain_ldm_jax.metrics import gr_ssim
from brain_ldm_jax.metrics import memorisation
from brain_ldm_jax.metrics import ssim as ssim_lib
from brain_ldm_jax.metrics import volumes as volumes_lib
from brain_ldm_jax.nn import autoencoder as autoencoder_lib

# Pinaya et al. 2022, Table 1 and the conditioning check.
PAPER_METRICS = {
    "LDM": dict(fid=0.0076, ms_ssim=0.6555, four_g_r_ssim=0.3883),
    "LDM+DDIM": dict(fid=0.0080, ms_ssim=0.6704, four_g_r_ssim=0.3957),
    "real": dict(fid=0.0005, ms_ssim=0.6536, four_g_r_ssim=0.3909),
}
PAPER_FIDELITY = {"ventricular_volume": dict(r=0.972, how="SynthSeg on 1000 samples"),
                  "age": dict(r=0.692, how="brain-age CNN")}
CONDITIONS_TSV = "conditions.tsv"
SECTIONS = ("run", "samples", "diversity", "fid", "conditioning", "memorisation", "figures")


class _Progress:
  """absl log lines with elapsed time and ETA for a counted loop."""

  def __init__(self, what: str, total: int):
    self.what, self.total, self.start = what, max(1, total), time.monotonic()

  def __call__(self, done: int) -> None:
    elapsed = time.monotonic() - self.start
    eta = elapsed / max(done, 1) * (self.total - done)
    logging.info("%s: %d/%d, %.1f s elapsed, ETA %.0f s", self.what, done, self.total, elapsed,
                 eta)


class _LazyVolumes:
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


def draw_conditions(subjects, names, num_samples: int, seed: int,
                    jitter: float = 0.1) -> tuple[np.ndarray, list[str]]:
  """(N, n) requested covariates drawn from the subjects' joint distribution, and the source ids.

  Whole subject rows are resampled (seeded), so the covariates keep the cohort's correlations
  (older subjects have larger ventricles); every continuous covariate then moves by Gaussian
  noise of `jitter` times its standard deviation, clipped to the subjects' range, so N samples
  request N distinct values instead of repeating a few subjects. Binary covariates (sex) are kept.
  """
  if not subjects:
    raise DataError("draw_conditions: no subjects to draw covariates from")
  rng = np.random.default_rng(seed)
  idx = rng.choice(len(subjects), num_samples, replace=num_samples > len(subjects))
  table = np.array([[s.covariates[n] for n in names] for s in subjects], np.float64)
  cond = table[idx]
  for j in range(len(names)):
    column = table[:, j]
    if len(np.unique(column)) <= 2:
      continue
    noise = rng.normal(0.0, jitter * column.std(), num_samples)
    cond[:, j] = np.clip(cond[:, j] + noise, column.min(), column.max())
  return cond, [subjects[i].participant_id for i in idx]


def subject_volumes(subjects, data_config) -> np.ndarray:
  """The subjects' preprocessed volumes (N, X, Y, Z) on the run's grid."""
  return _all(_LazyVolumes([s.image_path for s in subjects], data_config))


def fit_volume_calibration(run: api.Run, train, quantities, num_subjects: int, seed: int,
                           batch_size: int) -> volumes_lib.Calibration:
  """metrics.volumes' linear calibration on `num_subjects` training subjects picked by `seed`."""
  rng = np.random.default_rng(seed)
  k = min(len(train), int(num_subjects))
  picked = [train[i] for i in sorted(rng.choice(len(train), k, replace=False))]
  logging.info("calibrating volume measurements on %d training subjects", k)
  raw = volumes_lib.raw_measurements(_LazyVolumes([s.image_path for s in picked], run.config.data),
                                     run.affine, batch_size)
  truth = {q: np.array([s.covariates[q] for s in picked]) for q in quantities}
  return volumes_lib.fit_calibration(
      raw, truth, dict(source="training split of the run's cohort",
                       participants_tsv=manifest.tsv_path(run.config.data),
                       subjects=[s.participant_id for s in picked],
                       grid=dict(shape=list(run.config.data.shape),
                                 spacing=float(run.config.data.spacing))), quantities)


def generate(run: api.Run, cond: np.ndarray, e) -> np.ndarray:
  """N brains for covariates (N, n) in fixed-size batches (last padded), with ETA logging."""
  sample = api.make_sampler(run, sampler=e.sampler or None, num_steps=e.num_steps or None)
  key = jax.random.key(e.seed)
  bs, n = int(e.batch_size), len(cond)
  progress = _Progress("sampling", n)
  out = []
  for s in range(0, n, bs):
    chunk = cond[s:s + bs]
    k = len(chunk)
    if k < bs:  # same shapes, one compilation; sample i still uses fold_in(key, i)
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - k, axis=0)])
    out.append(np.asarray(sample(run.params, key, chunk, first_index=s))[:k])
    progress(s + k)
  return np.concatenate(out)


def write_samples(out_dir: str, volumes: np.ndarray, cond: np.ndarray, names, source_ids,
                  affine) -> None:
  os.makedirs(out_dir, exist_ok=True)
  rows = ["\t".join(("file", *names, "covariates_from"))]
  for i, (v, c, sid) in enumerate(zip(volumes, cond, source_ids)):
    name = f"sample-{i:04d}.nii.gz"
    nifti.save_volume(os.path.join(out_dir, name), v, affine)
    rows.append("\t".join((name, *(f"{x:.6g}" for x in c), sid)))
  figures.atomic_write_bytes(os.path.join(out_dir, CONDITIONS_TSV),
                             ("\n".join(rows) + "\n").encode())


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
  vols = _all(_LazyVolumes(paths, data_config))
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
    from brain_ldm_jax.metrics import med3d  # pylint: disable=import-outside-toplevel
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


# ----------------------------------------------------------------------------- figures + html


def make_figures(out_dir, real, real_ids, generated, gen_titles, cond_report, nn_gen, nn_real,
                 train_vols, train_ids, spacing, count: int) -> dict[str, str]:
  """PNG files (name -> file name in out_dir); all compared images share one window."""
  files = {}
  k = min(count, len(real), len(generated))
  window = figures.common_window(list(real[:k]), list(generated[:k]))
  sp = (spacing,) * 3
  figures.save_montage_png(list(real[:k]), os.path.join(out_dir, "montage_real.png"),
                           titles=real_ids[:k], window=window, spacing=sp,
                           suptitle="real (validation)")
  figures.save_montage_png(list(generated[:k]), os.path.join(out_dir, "montage_generated.png"),
                           titles=gen_titles[:k], window=window, spacing=sp, suptitle="generated")
  files["montage_real"] = "montage_real.png"
  files["montage_generated"] = "montage_generated.png"
  for q, row in cond_report.get("quantities", {}).items():
    unit = "mL"
    if "generated_values" in row:
      name = f"scatter_{q}_generated.png"
      v = row["generated_values"]
      figures.scatter_requested_vs_measured(v["requested"], v["measured"],
                                            os.path.join(out_dir, name), q.replace("_", " "), unit,
                                            title="generated")
      files[f"scatter_{q}_generated"] = name
    name = f"scatter_{q}_real.png"
    v = row["real_values"]
    figures.scatter_requested_vs_measured(v["recorded"], v["measured"], os.path.join(out_dir, name),
                                          q.replace("_", " "), unit, title="real (recorded)")
    files[f"scatter_{q}_real"] = name
  # Nearest-neighbour pairs: the generated brains closest to a training subject, beside it.
  order = np.argsort(nn_gen.l2)[:min(3, len(nn_gen.l2))]
  pair_vols, pair_titles = [], []
  for i in order:
    j = int(nn_gen.l2_index[i])
    pair_vols += [generated[i], train_vols[j]]
    pair_titles += [f"generated {i}", f"nearest: {train_ids[j]}"]
  nn_window = figures.common_window(pair_vols[0::2], pair_vols[1::2])
  figures.save_montage_png(pair_vols, os.path.join(out_dir, "nearest_neighbours.png"),
                           titles=pair_titles, window=nn_window, spacing=sp,
                           suptitle="closest generated brains and their nearest training subjects")
  files["nearest_neighbours"] = "nearest_neighbours.png"
  figures.dot_plot({"real val -> train": nn_real.l2, "generated -> train": nn_gen.l2},
                   os.path.join(out_dir, "memorisation_latent_l2.png"),
                   quantity="latent L2 distance to nearest training subject")
  figures.dot_plot({"real val -> train": nn_real.ssim, "generated -> train": nn_gen.ssim},
                   os.path.join(out_dir, "memorisation_ssim.png"),
                   quantity="SSIM to nearest training subject")
  files["memorisation_latent_l2"] = "memorisation_latent_l2.png"
  files["memorisation_ssim"] = "memorisation_ssim.png"
  return files


def _fmt(v, digits=4):
  if v is None:
    return "—"
  if isinstance(v, float):
    return "nan" if not np.isfinite(v) else f"{v:.{digits}f}"
  return html.escape(str(v))


def render_html(report: dict, out_dir: str) -> str:
  """A self-contained page: tables beside the paper's values, figures inlined as PNG data."""
  def img(name, alt):
    with open(os.path.join(out_dir, name), "rb") as f:
      data = base64.b64encode(f.read()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" '
            f'data-file="{html.escape(name)}"><figcaption>{html.escape(alt)} '
            f'(<a href="{html.escape(name)}">{html.escape(name)}</a>)</figcaption></figure>')

  d, f, c, m, fig = (report[k] for k in ("diversity", "fid", "conditioning", "memorisation",
                                          "figures"))
  fid_cell = _fmt(f.get("value")) if f.get("value") is not None else "refused"
  rows = [("this run: generated", fid_cell, d["generated"]["ms_ssim"],
           d["generated"]["four_g_r_ssim"]),
          ("this run: real (validation)", "—", d["real"]["ms_ssim"], d["real"]["four_g_r_ssim"])]
  rows += [(f"paper: {k}", v["fid"], v["ms_ssim"], v["four_g_r_ssim"])
           for k, v in PAPER_METRICS.items()]
  table = "".join(f"<tr><td>{html.escape(r[0])}</td>" + "".join(
      f"<td>{_fmt(x)}</td>" for x in r[1:]) + "</tr>" for r in rows)
  fid_note = (f"FID features: {html.escape(f['extractor'])}" if f.get("extractor")
              else f"FID refused: {html.escape(f.get('refused', ''))}")
  cond_rows = ""
  for q, row in c.get("quantities", {}).items():
    g = row.get("generated", {})
    paper = row.get("paper", {}).get("r")
    cond_rows += (f"<tr><td>{html.escape(q)}</td><td>{_fmt(g.get('r'), 3)}</td>"
                  f"<td>{_fmt(g.get('mae'), 2)}</td><td>{_fmt(row['real']['r'], 3)}</td>"
                  f"<td>{_fmt(row['real']['mae'], 2)}</td><td>{_fmt(paper, 3)}</td></tr>")
  scatters = "".join(img(v, k.replace("_", " ")) for k, v in fig.items() if k.startswith("scatter"))
  flagged = [r for r in m["samples"] if r["flagged"]]
  run = report["run"]
  return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>brain_ldm_jax evaluation</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:1em auto;color:#222}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;
text-align:right}}td:first-child,th:first-child{{text-align:left}}figure{{display:inline-block;
margin:4px;vertical-align:top}}img{{max-width:1100px}}.note{{color:#555;font-size:.9em}}</style>
</head><body>
<h1>Evaluation of {html.escape(run['run_dir'])}</h1>
<p class="note">{report['samples']['num_generated']} generated brains ({html.escape(report['samples']['source'])}),
{report['samples']['num_real']} real validation brains, grid {run['shape']} at {run['spacing']} mm,
sampler {html.escape(str(run['sampler']))} / {run['num_steps']} steps, seed {run['seed']}.</p>
<h2>Image quality and diversity</h2>
<table><tr><th></th><th>FID ↓</th><th>MS-SSIM</th><th>4-G-R-SSIM</th></tr>{table}</table>
<p class="note">Diversity: mean over {d['generated']['num_pairs']} (generated) and
{d['real']['num_pairs']} (real) random distinct pairs; closer to the real value is better.
MS-SSIM with {d['ms_ssim_scales']} scales (as many as fit the grid). {fid_note}.</p>
<h2>Real and generated brains (same slices, same window)</h2>
{img(fig['montage_real'], 'real validation brains')}
{img(fig['montage_generated'], 'generated brains')}
<h2>Conditioning fidelity</h2>
<table><tr><th>quantity</th><th>generated r</th><th>generated MAE (mL)</th><th>real r</th>
<th>real MAE (mL)</th><th>paper r</th></tr>{cond_rows}</table>
<p class="note">{html.escape(c.get('note', c.get('skipped', '')))}</p>
{scatters}
<h2>Memorisation audit</h2>
<p>{m['num_flagged']} of {m['num_generated']} generated brains flagged as near-copies.
Rule: {html.escape(m['rule'])}.</p>
<p class="note">Latent L2 nearest-neighbour distance, generated: median
{_fmt(m['generated']['l2'].get('median'))}; real-vs-real: median
{_fmt(m['real_vs_real']['l2'].get('median'))}. SSIM to nearest training subject, generated:
median {_fmt(m['generated']['ssim'].get('median'))}; real-vs-real: median
{_fmt(m['real_vs_real']['ssim'].get('median'))}. Flagged samples:
{html.escape(', '.join(str(r['sample']) for r in flagged) or 'none')}.</p>
{img(fig['memorisation_latent_l2'], 'latent distance to the nearest training subject')}
{img(fig['memorisation_ssim'], 'SSIM to the nearest training subject')}
{img(fig['nearest_neighbours'], 'nearest-neighbour pairs')}
<p class="note">report.json holds every number above and each sample's row.</p>
</body></html>
"""


# ----------------------------------------------------------------------------- the job


def run_evaluate_job(config, workdir: str) -> dict:
  """Evaluate config.evaluate.run_dir (default workdir); returns the report (process 0 writes it)."""
  e = config.evaluate
  run_dir = e.run_dir or workdir
  out_dir = e.out_dir or os.path.join(workdir, "evaluation")
  run = api.load_run(run_dir)
  data = run.config.data
  names = list(data.covariates)
  if not data.data_dir:
    raise ConfigError(f"{run_dir}/{api.RUN_FILE} names no data_dir: cannot find the run's cohort")
  subjects = manifest.load_cohort(data)
  train, val = manifest.split_subjects(subjects, data.val_fraction, data.split_seed)
  if len(val) < 2:
    raise DataError(f"the run's validation split has {len(val)} subjects; need >= 2 "
                    "(raise data.val_fraction in the run's config)")
  real_subjects = val[:int(e.max_real)] if e.max_real else val
  logging.info("evaluating %s: %d training, %d real validation subjects", run_dir, len(train),
               len(real_subjects))
  real = subject_volumes(real_subjects, data)
  real_ids = [s.participant_id for s in real_subjects]
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)

  if e.samples_dir:
    generated, cond, gen_ids = read_samples(e.samples_dir, names, data)
    source = f"read from {e.samples_dir}"
  else:
    if e.num_samples < 2:
      raise ConfigError(f"config.evaluate.num_samples={e.num_samples}: need >= 2")
    cond, cond_ids = draw_conditions(train, names, int(e.num_samples), int(e.seed))
    generated = generate(run, cond, e)
    gen_ids = [f"sample-{i:04d}" for i in range(len(generated))]
    source = (f"generated, covariates drawn from the rows of {len(set(cond_ids))} of the "
              f"{len(train)} training subjects, jittered")
    if writer and e.save_samples:
      write_samples(os.path.join(out_dir, "samples"), generated, cond, names, cond_ids, run.affine)

  autoencoder = autoencoder_lib.build_autoencoder(run.config.autoencoder)
  ae_params = run.params["autoencoder"]
  logging.info("diversity over %d pairs", e.num_pairs)
  div = diversity(generated, real, int(e.num_pairs), int(e.seed), int(e.batch_size))
  fid = compute_fid(e, real, generated, autoencoder, ae_params)
  cond_report = conditioning(run, e, train, real, real_subjects, generated, cond, names)
  mem_train = train[:int(e.memorisation_train_subjects)] if e.memorisation_train_subjects else train
  train_vols = _LazyVolumes([s.image_path for s in mem_train], data)
  mem, nn_gen, nn_real = memorisation_audit(e, autoencoder, ae_params, mem_train, train_vols, real,
                                            generated)

  gen_titles = gen_ids
  if cond is not None:
    gen_titles = [figures.sample_title(dict(zip(names, row))) for row in cond]
  report = dict(
      run=dict(run_dir=os.path.abspath(run_dir), checkpoint=run.checkpoint,
               shape=list(data.shape), spacing=float(data.spacing), covariates=names,
               sampler=e.sampler or run.config.sampling.sampler,
               num_steps=int(e.num_steps or run.config.sampling.num_steps), seed=int(e.seed)),
      samples=dict(num_generated=len(generated), num_real=len(real), source=source,
                   generated_ids=gen_ids, real_ids=real_ids,
                   requested=None if cond is None else cond.tolist()),
      diversity=div, fid=fid, conditioning=cond_report, memorisation=mem,
      paper=dict(metrics=PAPER_METRICS, fidelity=PAPER_FIDELITY))
  if not writer:
    return report
  report["figures"] = make_figures(out_dir, real, real_ids, generated, gen_titles, cond_report,
                                   nn_gen, nn_real, train_vols,
                                   [s.participant_id for s in mem_train], float(data.spacing),
                                   int(e.montage_count))
  figures.atomic_write_bytes(os.path.join(out_dir, "report.json"),
                             (json.dumps(report, indent=2, default=_json_default) + "\n").encode())
  figures.atomic_write_bytes(os.path.join(out_dir, "report.html"),
                             render_html(report, out_dir).encode())
  logging.info("evaluation written to %s (report.html, report.json)", out_dir)
  return report


def _json_default(o):
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(f"not JSON serialisable: {type(o).__name__}")


__all__ = ["PAPER_METRICS", "SECTIONS", "run_evaluate_job"]
