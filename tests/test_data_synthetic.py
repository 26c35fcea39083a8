"""The synthetic cohort: layout, ground truth from labels, ageing trends, determinism, the job."""

import csv
import hashlib
import json
import os

import ml_collections
import nibabel as nib
import numpy as np
import pytest
from scipy import stats

from brain_ldm_jax.data import manifest, nifti, synthetic
from brain_ldm_jax.jobs import cohort as cohort_job

SHAPE, SPACING, N = (40, 56, 40), 4.0, 14


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("cohort"))
  calls = []
  tsv = synthetic.make_cohort(out, N, seed=3, spacing=SPACING, shape=SHAPE, write_labels=True,
                              progress=lambda done, total: calls.append((done, total)))
  assert calls[-1] == (N, N)
  with open(tsv) as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  return out, rows


def _digest(path):
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_bids_layout_and_header(cohort):
  out, rows = cohort
  assert [r["participant_id"] for r in rows] == [f"sub-{i:04d}" for i in range(1, N + 1)]
  assert set(rows[0]) >= {"participant_id", "age", "sex", "ventricular_volume", "brain_volume"}
  description = json.load(open(os.path.join(out, "dataset_description.json")))
  assert description["BIDSVersion"]
  img = nib.load(os.path.join(out, "sub-0001", "anat", "sub-0001_T1w.nii.gz"))
  assert img.shape == SHAPE
  np.testing.assert_allclose(img.affine, nifti.mni_affine(SHAPE, SPACING))
  assert int(img.header["sform_code"]) == nifti.XFORM_MNI
  assert not [f for f in os.listdir(os.path.join(out, "sub-0001", "anat")) if f.startswith(".")]


def test_covariates_are_in_range(cohort):
  _, rows = cohort
  ages = np.array([float(r["age"]) for r in rows])
  assert np.all((ages >= 44) & (ages <= 82)) and ages.std() > 2
  assert {r["sex"] for r in rows} <= {"M", "F"} and len({r["sex"] for r in rows}) == 2


def test_ground_truth_volumes_equal_label_counts(cohort):
  out, rows = cohort
  voxel_ml = SPACING**3 / 1000
  for row in rows[:4]:
    sid = row["participant_id"]
    labels = np.asarray(nib.load(os.path.join(out, sid, "anat", f"{sid}_dseg.nii.gz")).dataobj)
    vent = np.count_nonzero(labels == synthetic.LABEL_VENTRICLE) * voxel_ml
    brain = np.count_nonzero(np.isin(labels, [synthetic.LABEL_GM, synthetic.LABEL_WM])) * voxel_ml
    assert float(row["ventricular_volume"]) == pytest.approx(vent, abs=1e-3)
    assert float(row["brain_volume"]) == pytest.approx(brain, abs=1e-3)
    assert vent > 0


def test_ventricles_grow_and_brain_shrinks_with_age(cohort):
  _, rows = cohort
  age = [float(r["age"]) for r in rows]
  vent = [float(r["ventricular_volume"]) for r in rows]
  # Head size (sex and individual) hides most of the atrophy in raw brain volume, as in real
  # cohorts; at a fixed head size the brain shrinks with age.
  brain_at_head_size = [float(r["brain_volume"]) / float(r["head_scale"])**3 for r in rows]
  assert stats.spearmanr(age, vent).statistic > 0.5
  assert stats.spearmanr(age, brain_at_head_size).statistic < -0.5
  # Ventricles vary several-fold across the cohort, as in UK Biobank.
  assert max(vent) / min(vent) > 3


def test_same_seed_same_bytes_other_seed_differs(cohort, tmp_path):
  out, _ = cohort
  again = str(tmp_path / "again")
  synthetic.make_cohort(again, 2, seed=3, spacing=SPACING, shape=SHAPE)
  for sid in ("sub-0001", "sub-0002"):
    rel = os.path.join(sid, "anat", f"{sid}_T1w.nii.gz")
    assert _digest(os.path.join(out, rel)) == _digest(os.path.join(again, rel))
  other = str(tmp_path / "other")
  synthetic.make_cohort(other, 1, seed=4, spacing=SPACING, shape=SHAPE)
  rel = os.path.join("sub-0001", "anat", "sub-0001_T1w.nii.gz")
  assert _digest(os.path.join(out, rel)) != _digest(os.path.join(other, rel))


def test_noise_is_a_1mm_scans_noise_as_the_loader_resamples_it():
  # A flat 1 mm phantom (background | tissue) with Rician noise, resampled to 4 mm by the loader's
  # own function, against the cohort's noise made directly at 4 mm: same floor, same fluctuation.
  rng = np.random.default_rng(0)
  sigma, tissue = 0.02, 0.7
  source = np.zeros((96, 96, 96), np.float32)
  source[:, 48:] = tissue
  noisy = np.abs(source + sigma * rng.standard_normal(source.shape, dtype=np.float32))
  grid = np.diag([4.0, 4.0, 4.0, 1.0])
  grid[:3, 3] = 1.5  # 4 mm voxel centres between the 1 mm ones
  loaded = nifti.resample_to_grid(noisy, np.eye(4), (24, 24, 24), grid)
  clean = np.zeros((24, 24, 24), np.float32)
  clean[:, 12:] = tissue
  made = synthetic._scanner_noise(clean, sigma, rng, 4.0)
  for region in (np.s_[3:21, 2:10, 3:21], np.s_[3:21, 14:22, 3:21]):
    assert made[region].mean() == pytest.approx(loaded[region].mean(), rel=0.02)
    assert made[region].std() == pytest.approx(loaded[region].std(), rel=0.15)
  # The fluctuation is the 1 mm noise times the filter's gain, far below 1 mm noise on 4 mm voxels.
  assert made[np.s_[3:21, 14:22, 3:21]].std() < 0.2 * sigma
  # At the source's own spacing nothing filters: the plain Rician magnitude.
  rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
  np.testing.assert_array_equal(
      synthetic._scanner_noise(clean, sigma, rng_a, 1.0),
      np.abs(clean + sigma * rng_b.standard_normal(clean.shape, dtype=np.float32)))


def test_cohort_loads_as_a_manifest_with_sex_coded(cohort):
  out, rows = cohort
  config = ml_collections.ConfigDict(dict(
      data_dir=out, participants_tsv="", image_column="",
      covariates=("age", "sex", "ventricular_volume", "brain_volume")))
  subjects = manifest.load_cohort(config)
  assert len(subjects) == N
  assert [s.covariates["sex"] for s in subjects] == [1.0 if r["sex"] == "M" else 0.0 for r in rows]
  assert subjects[0].extra["head_scale"] == rows[0]["head_scale"]


def _config(tmp_path, num_subjects=2):
  from brain_ldm_jax import presets
  config = presets.base_config("test")
  config.data.shape = (16, 20, 16)  # a small field of view: only the job logic is tested here
  config.data.spacing = SPACING
  config.data.synthetic.spacing = SPACING  # the module's template cache is reused
  config.data.synthetic.num_subjects = num_subjects
  config.cohort = dict(out_dir="")
  return config


def test_ensure_cohort_makes_reuses_and_remakes(tmp_path):
  config = _config(tmp_path)
  data_dir = synthetic.ensure_cohort(config, str(tmp_path))
  assert data_dir == str(tmp_path / "cohort")
  tsv = os.path.join(data_dir, "participants.tsv")
  stamp = os.stat(tsv).st_mtime_ns
  assert synthetic.ensure_cohort(config, str(tmp_path)) == data_dir
  assert os.stat(tsv).st_mtime_ns == stamp  # complete: reused
  os.remove(os.path.join(data_dir, synthetic.COMPLETE_MARKER))  # as if interrupted
  synthetic.ensure_cohort(config, str(tmp_path))
  assert os.stat(tsv).st_mtime_ns != stamp
  config.data.data_dir = "/some/real/data"
  assert synthetic.ensure_cohort(config, str(tmp_path)) == "/some/real/data"


def test_cohort_job_writes_out_dir(tmp_path):
  config = _config(tmp_path, num_subjects=1)
  config.cohort.out_dir = str(tmp_path / "elsewhere")
  cohort_job.run_cohort_job(config, str(tmp_path / "work"))
  assert os.path.exists(tmp_path / "elsewhere" / "sub-0001" / "anat" / "sub-0001_T1w.nii.gz")
  assert os.path.exists(tmp_path / "elsewhere" / synthetic.COMPLETE_MARKER)
