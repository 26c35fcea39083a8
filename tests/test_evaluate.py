"""The evaluate job end to end on a tiny untrained run (random weights, tiny synthetic cohort)."""

import json
import os
import re

import numpy as np
import pytest

from brain_ldm_jax import api
from brain_ldm_jax import evaluate
from brain_ldm_jax.data import manifest
from brain_ldm_jax.data import nifti
from brain_ldm_jax.data import synthetic
from brain_ldm_jax.jobs import evaluate as evaluate_job
from configs import evaluate as evaluate_config
from configs import ldm as ldm_config
from random_weights import random_params


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  root = tmp_path_factory.mktemp("evaluate")
  config = ldm_config.get_config("test")
  config.data.val_fraction = 0.3
  config.data.synthetic.num_subjects = 10
  cohort = synthetic.build_cohort(str(root / "cohort"), config.data)
  config.data.data_dir = cohort
  subjects = manifest.load_cohort(config.data)
  train, _ = manifest.split_subjects(subjects, config.data.val_fraction, config.data.split_seed)
  stats = manifest.CovariateStats.from_subjects(train, config.data.covariates)
  run_dir = str(root / "run")
  api.save_run(run_dir, config, random_params(config), stats, 1.0,
               nifti.mni_affine(tuple(config.data.shape), config.data.spacing))
  e = evaluate_config.get_config("test")
  e.evaluate.run_dir = run_dir
  e.evaluate.num_steps = 2
  e.evaluate.fid_extractor = "autoencoder_latent"
  workdir = str(root / "eval")
  result = evaluate_job.run_evaluate_job(e, workdir)
  return result, os.path.join(workdir, "evaluation")


def test_report_has_every_section(report):
  result, out_dir = report
  with open(os.path.join(out_dir, "report.json")) as f:
    saved = json.load(f)
  for section in evaluate_job.SECTIONS:
    assert section in saved, section
  assert saved["samples"]["num_generated"] == 4
  for s in ("generated", "real"):
    d = saved["diversity"][s]
    assert -1 <= d["ms_ssim"] <= 1 and -1 <= d["four_g_r_ssim"] <= 1 and d["num_pairs"] >= 1
  assert np.isfinite(saved["fid"]["value"]) and "NOT Med3D" in saved["fid"]["extractor"]
  for q in ("ventricular_volume", "brain_volume"):
    row = saved["conditioning"]["quantities"][q]
    assert row["generated"]["n"] == 4 and "mae" in row["generated"]
  assert saved["conditioning"]["calibration"]["provenance"]["subjects"]
  assert len(saved["memorisation"]["samples"]) == 4 and "rule" in saved["memorisation"]
  assert saved["paper"]["metrics"]["LDM"]["ms_ssim"] == 0.6555


def test_html_references_existing_figures(report):
  _, out_dir = report
  with open(os.path.join(out_dir, "report.html")) as f:
    page = f.read()
  names = set(re.findall(r'href="([^"]+\.png)"', page))
  assert {"montage_real.png", "montage_generated.png", "nearest_neighbours.png"} <= names
  for name in names:
    assert os.path.getsize(os.path.join(out_dir, name)) > 0
  assert page.count("data:image/png;base64,") == len(names)
  assert "0.6555" in page  # the paper's column
  assert os.path.exists(os.path.join(out_dir, "samples", evaluate.CONDITIONS_TSV))


def test_fid_refused_without_weights():
  e = evaluate_config.get_config("test").evaluate
  out = evaluate.compute_fid(e, None, None, None, None)
  assert out["value"] is None and "fid_weights_path" in out["refused"]
