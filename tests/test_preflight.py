"""Data pre-flight: every problem of a cohort (table and image headers) in one message."""

import gzip
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path as NIBABEL_DATA

from brain_ldm_jax import presets
from brain_ldm_jax.data import nifti, preflight
from brain_ldm_jax.errors import DataError
from brain_ldm_jax.jobs import check_data

SHAPE, SPACING = (32, 32, 32), 4.0  # the test preset's grid
HEADER = "participant_id\tage\tsex\tventricular_volume\tbrain_volume"
GOOD = ("sub-01", "sub-14", "sub-15")
# subject -> what the report must say about it
BAD = {
    "sub-02": "no image at",
    "sub-03": "cut_T1w.nii.gz: is truncated or corrupt: its gzip stream breaks off",
    "sub-04": "is 4D with shape (32, 32, 32, 2)",
    "sub-05": "has shape (32, 32, 1); a 3D volume is needed",
    "sub-06": "has voxel sizes [4.0, 4.0, 0.0] mm",
    "sub-07": "does not look like an image in MNI space: its field of view holds only",
    "sub-08": "has non-numeric age='sixty'",
    "sub-09": "has sex='X'; use M/F",
    "sub-10": "appears twice",
    "sub-11": "not a readable NIfTI file",
    "sub-12": "cut_T1w.nii: is truncated: ",
    "sub-13": "has no value in column 'brain_volume'",
}


def _save(path, data, affine, sform_only=False):
  img = nib.Nifti1Image(np.asarray(data, np.int16), None if sform_only else affine)
  img.header.set_sform(affine, code=2)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  nib.save(img, path)
  return path


def _image(root, sid, name="T1w.nii.gz"):
  return os.path.join(root, sid, "anat", f"{sid}_{name}")


def _cut(path):
  blob = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(blob[:len(blob) * 2 // 3])


def _cohort(root):
  """15 rows: three good subjects and one of each problem of BAD."""
  grid = nifti.mni_affine(SHAPE, SPACING)
  volume = np.random.default_rng(0).integers(0, 100, SHAPE)
  rows = {sid: f"{sid}\t60\tM\t20\t1400" for sid in [f"sub-{i:02d}" for i in range(1, 16)]}
  rows["sub-08"] = "sub-08\tsixty\tF\t20\t1400"
  rows["sub-09"] = "sub-09\t60\tX\t20\t1400"
  rows["sub-13"] = "sub-13\t60\tF\t20\tn/a"
  for sid in rows:
    if sid not in ("sub-02", "sub-03", "sub-12"):
      _save(_image(root, sid), volume, grid)
  _cut(_save(_image(root, "sub-03", "cut_T1w.nii.gz"), volume, grid))
  _cut(_save(_image(root, "sub-12", "cut_T1w.nii"), volume, grid))
  _save(_image(root, "sub-04"), np.stack([volume, volume], -1), grid)
  _save(_image(root, "sub-05"), volume[:, :, :1], grid)
  _save(_image(root, "sub-06"), volume, grid @ np.diag([1.0, 1.0, 0.0, 1.0]), sform_only=True)
  shutil.copy(os.path.join(NIBABEL_DATA, "anatomical.nii"), _image(root, "sub-07", "T1w.nii"))
  os.remove(_image(root, "sub-07"))
  with open(_image(root, "sub-11"), "wb") as f:
    f.write(gzip.compress(b"not an image"))
  lines = [HEADER, *rows.values(), rows["sub-10"]]
  with open(os.path.join(root, "participants.tsv"), "w") as f:
    f.write("\n".join(lines) + "\n")


def _config(root, **data):
  config = presets.base_config("test")
  config.job = "check_data"
  config.data.data_dir = str(root)
  config.data.update(data)
  return config


@pytest.fixture(scope="module")
def bad_cohort(tmp_path_factory):
  root = tmp_path_factory.mktemp("preflight")
  _cohort(str(root))
  return root


def test_every_problem_of_the_cohort_in_one_message(bad_cohort):
  with pytest.raises(DataError) as e:
    preflight.checked_subjects(_config(bad_cohort).data)
  lines = str(e.value).splitlines()
  assert "12 of 15 subjects have problems (12 in all)" in lines[0]
  assert "data.skip_bad_subjects=True" in lines[0]
  assert len(lines) == 1 + len(BAD)
  for sid, what in BAD.items():
    assert sum(f"{sid}" in line and what in line for line in lines[1:]) == 1, (sid, lines)


def test_skipping_keeps_the_good_subjects(bad_cohort):
  subjects = preflight.checked_subjects(_config(bad_cohort, skip_bad_subjects=True).data)
  assert tuple(s.participant_id for s in subjects) == GOOD


def test_assume_mni_accepts_the_native_image(bad_cohort):
  cohort = preflight.check_cohort(_config(bad_cohort, assume_mni=True).data)
  assert "sub-07" not in cohort.bad_subjects() and len(cohort.bad_subjects()) == len(BAD) - 1


def test_headers_only(bad_cohort, monkeypatch):
  def no_voxels(*args, **kwargs):
    raise AssertionError("the pre-flight read voxels")
  monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", no_voxels)
  monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__getitem__", no_voxels)
  assert preflight.check_cohort(_config(bad_cohort).data).bad_subjects() == set(BAD)


def test_training_runs_the_pre_flight_first(bad_cohort, tmp_path):
  from brain_ldm_jax.train import pipeline  # pylint: disable=import-outside-toplevel
  with pytest.raises(DataError, match=r"12 of 15 subjects have problems"):
    pipeline.prepare_data(_config(bad_cohort), str(tmp_path))


def test_check_data_job(bad_cohort, tmp_path, capsys):
  clean = tmp_path / "clean"
  for sid in GOOD:
    shutil.copytree(bad_cohort / sid, clean / sid)
  (clean / "participants.tsv").write_text(
      "\n".join([HEADER] + [f"{sid}\t60\tM\t20\t1400" for sid in GOOD]) + "\n")
  check_data.run_check_data_job(_config(clean), str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert "3 subjects, table and image headers checked" in out and "no problems" in out
  # Through the command line: the report as the error (no traceback) and a non-zero exit.
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  bad = subprocess.run([sys.executable, "-m", "brain_ldm_jax.main",
                        "--config=configs/check_data.py:test", f"--workdir={tmp_path / 'run'}",
                        f"--config.data.data_dir={bad_cohort}"],
                       cwd=repo, capture_output=True, text=True, check=False)
  assert bad.returncode != 0
  assert "12 of 15 subjects have problems" in bad.stderr and "Traceback" not in bad.stderr
  assert all(sid in bad.stderr for sid in BAD)


def test_gzip_trailer_and_stream(tmp_path):
  grid = nifti.mni_affine(SHAPE, SPACING)
  raw = tmp_path / "x.nii"
  _save(str(raw), np.random.default_rng(1).integers(0, 100, SHAPE), grid)
  blob = raw.read_bytes()
  # Two gzip streams (as block-gzip writers make): the trailer gives the last one's size only.
  multi = tmp_path / "multi.nii.gz"
  multi.write_bytes(gzip.compress(blob[:1000]) + gzip.compress(blob[1000:]))
  # A complete gzip stream of a file cut short: the trailer is right about what it holds.
  short = tmp_path / "short.nii.gz"
  short.write_bytes(gzip.compress(blob[:-5000]))
  check = lambda p: preflight.image_problems(str(p), SHAPE, grid, assume_mni=False)
  assert check(multi) == []
  assert check(short) == [f"{short}: is truncated: {len(blob) - 5000} bytes of contents, its "
                          f"header needs {len(blob)}; re-export or re-download the file"]
