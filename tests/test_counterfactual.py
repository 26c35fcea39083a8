"""Counterfactual edits of real subjects on a tiny random-weight run (test preset, 2 DDIM steps).

The math of the inversion is tested in test_diffusion_inversion.py; here: the API's determinism,
batch invariance and shapes, and the job's files and errors.
"""

import csv
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from brain_ldm_jax import api
from brain_ldm_jax import counterfactual
from brain_ldm_jax import networks
from brain_ldm_jax.data import manifest
from brain_ldm_jax.data import nifti
from brain_ldm_jax.data import synthetic
from brain_ldm_jax.errors import ConfigError, DataError
from brain_ldm_jax.jobs import counterfactual as counterfactual_job
from configs import counterfactual as counterfactual_config
from configs import ldm as ldm_config
from random_weights import random_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A sampling-ready random-weight run of a 10-subject synthetic cohort: (run_dir, run)."""
  root = tmp_path_factory.mktemp("counterfactual")
  config = ldm_config.get_config("test")
  config.data.val_fraction = 0.3
  config.data.synthetic.num_subjects = 10
  config.sampling.num_steps = 2
  config.data.data_dir = synthetic.build_cohort(str(root / "cohort"), config.data)
  train, _ = manifest.split_subjects(manifest.load_cohort(config.data), config.data.val_fraction,
                                     config.data.split_seed)
  stats = manifest.CovariateStats.from_subjects(train, config.data.covariates)
  run_dir = str(root / "run")
  api.save_run(run_dir, config, random_params(config), stats, 1.0,
               nifti.mni_affine(tuple(config.data.shape), config.data.spacing))
  return run_dir, api.load_run(run_dir)


def _subjects(run, n):
  data = run.config.data
  subjects = manifest.load_cohort(data)[:n]
  images = np.stack([nifti.load_volume(s.image_path, tuple(data.shape), data.spacing,
                                       tuple(data.clip_percentiles))[0] for s in subjects])
  cond = {k: [s.covariates[k] for s in subjects] for k in data.covariates}
  return images, cond


def test_edit_is_deterministic_and_batch_invariant(tiny):
  _, run = tiny
  images, cond = _subjects(run, 2)
  older = dict(cond, age=[a + 5 for a in cond["age"]])
  edit = counterfactual.make_editor(run)
  both = np.asarray(edit(run.params, images, cond, older))
  assert both.shape == (2, *run.config.data.shape) and both.min() >= 0 and both.max() <= 1
  np.testing.assert_array_equal(both, edit(run.params, images, cond, older))
  for i in range(2):
    one = np.asarray(edit(run.params, images[i:i + 1], {k: v[i:i + 1] for k, v in cond.items()},
                          {k: v[i:i + 1] for k, v in older.items()}))
    np.testing.assert_array_equal(one[0], both[i])  # bitwise: the same batch-1 program
  unchanged = np.asarray(edit(run.params, images, cond, cond))
  assert np.abs(unchanged - both).max() > 1e-4  # the covariates reach the result


def test_inverter_shapes_and_determinism(tiny):
  _, run = tiny
  images, cond = _subjects(run, 1)
  invert = counterfactual.make_inverter(run)
  noise = np.asarray(invert(run.params, images, cond))
  assert noise.shape == (1, *networks.latent_shape(run.config)) and np.all(np.isfinite(noise))
  np.testing.assert_array_equal(noise, invert(run.params, images, cond))


def test_api_refuses_images_off_the_grid_and_bad_strength(tiny):
  _, run = tiny
  images, cond = _subjects(run, 1)
  edit = counterfactual.make_editor(run)
  with pytest.raises(DataError, match=r"not \(batch, 32, 32, 32\)"):
    edit(run.params, images[:, :16], cond, cond)
  with pytest.raises(DataError, match="unknown covariates height"):
    edit(run.params, images, cond, dict(cond, height=[1.0]))
  with pytest.raises(ConfigError, match="strength"):
    counterfactual.make_editor(run, strength=0.0)


def test_changes_and_targets():
  names = ("age", "sex", "ventricular_volume")
  changes = counterfactual.parse_changes("age=+10, ventricular_volume=*1.5, sex=F", names)
  assert [str(c) for c in changes] == ["age=+10", "ventricular_volume=*1.5", "sex=0"]
  assert [c.apply(40.0) for c in changes] == [50.0, 60.0, 0.0]
  assert counterfactual.parse_changes("age=-3", names)[0].apply(40.0) == 37.0
  with pytest.raises(DataError, match="unknown covariate 'height'.*age, sex"):
    counterfactual.parse_changes("height=+3", names)
  for bad in ("age", "age=old", "age=+1,age=+2", ""):
    with pytest.raises(ConfigError):
      counterfactual.parse_changes(bad, names)
  stats = manifest.CovariateStats(names, (40.0, 0.0, 10.0), (80.0, 1.0, 50.0))
  subjects = [manifest.Subject("sub-1", "", dict(age=70.0, sex=1.0, ventricular_volume=20.0))]
  _, before, after = counterfactual.plan_targets(subjects, names, stats, changes=changes[:1])
  np.testing.assert_array_equal(after - before, [[10.0, 0.0, 0.0]])
  with pytest.raises(DataError, match=r"sub-1: target age=90 is outside .* \[40, 80\]"):
    counterfactual.plan_targets(subjects, names, stats,
                                changes=counterfactual.parse_changes("age=+20", names))


def _job_config(run_dir, **fields):
  config = counterfactual_config.get_config("test")
  config.counterfactual.run_dir = run_dir
  for k, v in fields.items():
    config.counterfactual[k] = v
  return config


def test_job_writes_nifti_figures_and_tables(tiny, tmp_path):
  run_dir, run = tiny
  data = run.config.data
  _, val = manifest.split_subjects(manifest.load_cohort(data), data.val_fraction, data.split_seed)
  j = data.covariates.index("ventricular_volume")
  middle = (run.stats.minimum[j] + run.stats.maximum[j]) / 2
  targets = tmp_path / "targets.tsv"
  targets.write_text("participant_id\tventricular_volume\n"
                     + "".join(f"{s.participant_id}\t{middle}\n" for s in val))
  summary = counterfactual_job.run_counterfactual_job(
      _job_config(run_dir, targets_tsv=str(targets)), str(tmp_path))
  out = tmp_path / "counterfactual"
  with open(out / "changes.tsv", newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  assert [r["participant_id"] for r in rows] == [s.participant_id for s in val]
  for row, subject in zip(rows, val):
    v = subject.covariates["ventricular_volume"]
    assert float(row["requested_ventricular_volume_change"]) == pytest.approx(middle - v,
                                                                             abs=1e-4)
    assert np.isfinite(float(row["measured_ventricular_volume_change"]))
    assert float(row["age_to"]) == float(row["age_from"])
    sid = subject.participant_id
    for kind in ("edited", "reconstruction", "difference"):
      img = nib.load(out / sid / f"{sid}_{kind}.nii.gz")
      assert img.shape == tuple(data.shape) and int(img.header["sform_code"]) == nifti.XFORM_MNI
      np.testing.assert_allclose(img.affine, run.affine)
    edited, recon, diff = (np.asarray(nib.load(out / sid / f"{sid}_{k}.nii.gz").dataobj)
                           for k in ("edited", "reconstruction", "difference"))
    np.testing.assert_allclose(diff, edited - recon, atol=1e-6)
    assert (out / sid / f"{sid}_counterfactual.png").read_bytes()[:4] == b"\x89PNG"
  text = (out / "summary.json").read_text()
  assert "NaN" not in text  # strict JSON: undefined fits are null
  saved = json.loads(text)
  assert saved["num_subjects"] == len(val) == summary["num_subjects"]
  assert set(saved["changes"]) == {"ventricular_volume", "brain_volume"}
  assert saved["changes"]["ventricular_volume"]["n"] == len(val)
  assert saved["changes"]["brain_volume"]["r"] is None  # no brain-volume change was requested
  assert saved["reconstruction_vs_recorded"]["ventricular_volume"]["n"] == len(val)
  assert saved["reconstruction"]["autoencoder_mae"] > 0
  assert set(saved["regions"]) == set(counterfactual.REGIONS)
  assert "changes_ventricular_volume.png" in saved["figures"]


def test_job_refuses_targets_out_of_range_and_images_off_the_grid(tiny, tmp_path):
  run_dir, run = tiny
  with pytest.raises(DataError, match=r"target age=[\d.]+ is outside the run's training range"):
    counterfactual_job.run_counterfactual_job(_job_config(run_dir, change="age=+500"),
                                          str(tmp_path))
  subject = manifest.load_cohort(run.config.data)[0]
  img = nib.load(subject.image_path)
  moved = np.array(img.affine)
  moved[0, 3] += 400.0  # far outside MNI space
  bids = tmp_path / "bids"
  path = bids / "sub-moved" / "anat" / "sub-moved_T1w.nii.gz"
  os.makedirs(path.parent)
  nib.save(nib.Nifti1Image(np.asarray(img.dataobj), moved), str(path))
  names = run.config.data.covariates
  (bids / "participants.tsv").write_text(
      "participant_id\t" + "\t".join(names) + "\nsub-moved\t"
      + "\t".join(f"{subject.covariates[k]:g}" for k in names) + "\n")
  with pytest.raises(DataError, match="sub-moved_T1w.nii.gz"):
    counterfactual_job.run_counterfactual_job(
        _job_config(run_dir, cohort=str(bids), change=f"age={run.stats.minimum[0]}"), str(tmp_path))


def test_cli_unknown_covariate_is_one_line(tiny, tmp_path):
  run_dir, _ = tiny
  result = subprocess.run(
      [sys.executable, "-m", "brain_ldm_jax.main", "--config=configs/counterfactual.py:test",
       f"--workdir={tmp_path}", f"--config.counterfactual.run_dir={run_dir}",
       "--config.counterfactual.change=height=+3"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert lines == ["error: counterfactual.change: unknown covariate 'height'; the run's "
                   "covariates are age, sex, ventricular_volume, brain_volume"]
  assert "Traceback" not in result.stderr
