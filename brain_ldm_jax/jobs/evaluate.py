"""The `evaluate` job: how good, diverse, faithful and original are a trained run's brains?

    python -m brain_ldm_jax.main --config=configs/evaluate.py --workdir=DIR \
        --config.evaluate.run_dir=RUN

Draws covariates from the run's training cohort and generates brains for them (or reads
samples_dir), then measures them with brain_ldm_jax/evaluate.py: diversity, FID, conditioning
fidelity, memorisation. Writes report.json, report.html (self-contained, figures inline) and the
PNGs beside it; only process 0 writes.
"""

from __future__ import annotations

import base64
import html
import json
import os
import time

import jax
import numpy as np
from absl import logging

from brain_ldm_jax import api
from brain_ldm_jax import charts
from brain_ldm_jax import covariates
from brain_ldm_jax import evaluate
from brain_ldm_jax import figures
from brain_ldm_jax import files
from brain_ldm_jax import sampling
from brain_ldm_jax.data import manifest
from brain_ldm_jax.errors import ConfigError, DataError
from brain_ldm_jax.nn import autoencoder as autoencoder_lib

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
      charts.scatter_requested_vs_measured(v["requested"], v["measured"],
                                            os.path.join(out_dir, name), q.replace("_", " "), unit,
                                            title="generated")
      files[f"scatter_{q}_generated"] = name
    name = f"scatter_{q}_real.png"
    v = row["real_values"]
    charts.scatter_requested_vs_measured(v["recorded"], v["measured"], os.path.join(out_dir, name),
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
  charts.dot_plot({"real val -> train": nn_real.l2, "generated -> train": nn_gen.l2},
                   os.path.join(out_dir, "memorisation_latent_l2.png"),
                   quantity="latent L2 distance to nearest training subject")
  charts.dot_plot({"real val -> train": nn_real.ssim, "generated -> train": nn_gen.ssim},
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
           for k, v in evaluate.PAPER_METRICS.items()]
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
  real = evaluate.subject_volumes(real_subjects, data)
  real_ids = [s.participant_id for s in real_subjects]
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)

  if e.samples_dir:
    generated, cond, gen_ids = evaluate.read_samples(e.samples_dir, names, data)
    source = f"read from {e.samples_dir}"
  else:
    if e.num_samples < 2:
      raise ConfigError(f"config.evaluate.num_samples={e.num_samples}: need >= 2")
    cond, cond_ids = covariates.draw_conditions(train, names, int(e.num_samples), int(e.seed))
    options = api.sampling_options(run, sampler=e.sampler, num_steps=e.num_steps)
    sample = sampling.make_volume_sampler(run, options, batch_size=int(e.batch_size))
    generated = sample(run.params, jax.random.key(int(e.seed)), cond,
                       progress=_Progress("sampling", len(cond)))
    gen_ids = [f"sample-{i:04d}" for i in range(len(generated))]
    source = (f"generated, covariates drawn from the rows of {len(set(cond_ids))} of the "
              f"{len(train)} training subjects, jittered")
    if writer and e.save_samples:
      evaluate.write_samples(os.path.join(out_dir, "samples"), generated, cond, names, cond_ids,
                             run.affine)

  autoencoder = autoencoder_lib.build_autoencoder(run.config.autoencoder)
  ae_params = run.params["autoencoder"]
  logging.info("diversity over %d pairs", e.num_pairs)
  div = evaluate.diversity(generated, real, int(e.num_pairs), int(e.seed), int(e.batch_size))
  fid = evaluate.compute_fid(e, real, generated, autoencoder, ae_params)
  cond_report = evaluate.conditioning(run, e, train, real, real_subjects, generated, cond, names)
  mem_train = train[:int(e.memorisation_train_subjects)] if e.memorisation_train_subjects else train
  train_vols = evaluate.LazyVolumes([s.image_path for s in mem_train], data)
  mem, nn_gen, nn_real = evaluate.memorisation_audit(e, autoencoder, ae_params, mem_train,
                                                     train_vols, real, generated)

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
      paper=dict(metrics=evaluate.PAPER_METRICS, fidelity=evaluate.PAPER_FIDELITY))
  if not writer:
    return report
  report["figures"] = make_figures(out_dir, real, real_ids, generated, gen_titles, cond_report,
                                   nn_gen, nn_real, train_vols,
                                   [s.participant_id for s in mem_train], float(data.spacing),
                                   int(e.montage_count))
  files.write_text_atomic(os.path.join(out_dir, "report.json"),
                          json.dumps(report, indent=2, default=_json_default) + "\n")
  files.write_text_atomic(os.path.join(out_dir, "report.html"), render_html(report, out_dir))
  logging.info("evaluation written to %s (report.html, report.json)", out_dir)
  return report



def _json_default(o):
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(f"not JSON serialisable: {type(o).__name__}")
