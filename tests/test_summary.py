"""The `ldm` job's samples and summary stages, the covariate sweep, and the covariate drawing that
the summary shares with the evaluate job; on a tiny untrained run (random weights)."""

import json
import os

import jax
import nibabel as nib
import numpy as np
import pytest

from brain_ldm_jax import api
from brain_ldm_jax import covariates
from brain_ldm_jax import summary
from brain_ldm_jax.data import manifest
from brain_ldm_jax.data import nifti
from brain_ldm_jax.data import synthetic
from brain_ldm_jax.errors import DataError
from brain_ldm_jax.jobs import ldm as ldm_job
from configs import ldm as ldm_config
from random_weights import random_params


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A sampling-ready run of the test preset on a 12-subject synthetic cohort."""
  root = tmp_path_factory.mktemp("summary")
  config = ldm_config.get_config("test")
  config.data.val_fraction = 0.25
  config.data.data_dir = synthetic.build_cohort(str(root / "cohort"), config.data)
  train, _ = _split(config)
  stats = manifest.CovariateStats.from_subjects(train, config.data.covariates)
  workdir = str(root / "run")
  api.save_run(workdir, config, random_params(config), stats, 1.0,
               nifti.mni_affine(tuple(config.data.shape), config.data.spacing))
  return workdir, config


def _split(config):
  subjects = manifest.load_cohort(config.data)
  return manifest.split_subjects(subjects, config.data.val_fraction, config.data.split_seed)


@pytest.fixture(scope="module")
def job(run_dir):
  """The job's samples and summary stages on the trained-looking run."""
  workdir, config = run_dir
  config = config.copy_and_resolve_references()
  config.stages = ("samples", "summary")
  ldm_job.run_ldm_job(config, workdir)
  return workdir, config


def test_summary_json_has_every_key_finite(job):
  workdir, config = job
  with open(os.path.join(workdir, summary.SUMMARY_FILE)) as f:
    saved = json.load(f)
  for key in summary.KEYS:
    assert key in saved, key
    value = saved[key]
    if value is None:  # only an undefined r, and the summary says why
      assert key.endswith("_r") and any(key[:-2] in note for note in saved["notes"])
    else:
      assert np.isfinite(value), (key, value)
  assert saved["num_samples"] == config.sampling.summary_samples
  assert -1 <= saved["ae_val_ssim"] <= 1 and saved["seconds_total"] > 0
  assert saved["real_set"] == "validation" and saved["num_real"] >= 2
  block = summary.format_block(saved)
  assert "ventricular volume" in block and "MS-SSIM of pairs" in block


def test_samples_stage_writes_samples_and_sweeps(job):
  workdir, config = job
  out = os.path.join(workdir, summary.SAMPLES_DIR)
  assert os.path.getsize(os.path.join(out, "samples.png")) > 0
  for name in config.sampling.sweep_covariates:
    assert os.path.getsize(os.path.join(out, f"sweep_{name}.png")) > 0
    files = sorted(os.listdir(os.path.join(out, f"sweep_{name}")))
    assert len(files) == config.sampling.sweep_values
    assert nib.load(os.path.join(out, f"sweep_{name}", files[0])).shape == tuple(config.data.shape)


def test_sweep_shares_one_noise(run_dir):
  workdir, _ = run_dir
  run = api.load_run(workdir)
  sample = api.make_sampler(run)
  key = jax.random.key(3)
  fixed = {"age": 60.0, "sex": 1.0, "ventricular_volume": 30.0, "brain_volume": 1200.0}
  same = api.sweep(sample, run.params, key, fixed, "age", [70.0, 70.0])
  assert same.shape == (2, *run.config.data.shape)
  np.testing.assert_array_equal(same[0], same[1])
  # The first sample of a batch uses fold_in(key, 0): the sweep's noise.
  alone = np.asarray(sample(run.params, key, {**fixed, "age": [70.0]}))[0]
  np.testing.assert_array_equal(same[0], alone)
  swept = api.sweep(sample, run.params, key, fixed, "age", [45.0, 80.0])
  assert not np.array_equal(swept[0], swept[1])
  with pytest.raises(DataError, match="height"):
    api.sweep(sample, run.params, key, fixed, "height", [1.0])


def test_sweep_values_span_the_training_range(run_dir):
  workdir, config = run_dir
  run = api.load_run(workdir)
  train, _ = _split(config)
  values = summary.sweep_values(run.stats, "age", 5)
  ages = [s.covariates["age"] for s in train]
  assert values[0] == min(ages) and values[-1] == max(ages) and len(values) == 5
  typical = summary.typical_covariates(train, config.data.covariates)
  assert typical["sex"] in (0.0, 1.0)
  assert typical["age"] == np.median(ages)


def test_drawn_conditions_span_the_training_cohort(run_dir):
  _, config = run_dir
  train, val = _split(config)
  names = list(config.data.covariates)
  cond, ids = covariates.draw_conditions(train, names, 64, seed=0)
  again, _ = covariates.draw_conditions(train, names, 64, seed=0)
  np.testing.assert_array_equal(cond, again)
  assert cond.shape == (64, len(names)) and set(ids) <= {s.participant_id for s in train}
  vent = cond[:, names.index("ventricular_volume")]
  # Far more distinct requests than the validation subjects hold, all inside the training range.
  assert len(np.unique(vent)) > 2 * len(val)
  table = np.array([[s.covariates[n] for n in names] for s in train])
  assert np.all(cond >= table.min(0)) and np.all(cond <= table.max(0))
  assert set(np.unique(cond[:, names.index("sex")])) <= {0.0, 1.0}


def test_undefined_r_is_reported_not_nan():
  fit = summary.volume_fidelity(np.array([10.0, 20.0, 30.0]), np.array([5.0, 5.0, 5.0]))
  assert fit["r"] is None and "measured values are constant" in fit["note"]
  assert fit["mae"] == pytest.approx(15.0)
  good = summary.volume_fidelity(np.array([10.0, 20.0, 30.0]), np.array([11.0, 19.0, 33.0]))
  assert 0.9 < good["r"] <= 1 and "note" not in good
