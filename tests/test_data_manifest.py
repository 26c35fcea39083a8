"""participants.tsv manifests, image discovery, splits, covariate scaling and their errors."""

import os

import ml_collections
import numpy as np
import pytest

from brain_ldm_jax.data import manifest
from brain_ldm_jax.errors import ConfigError, DataError

COVARIATES = ("age", "sex", "ventricular_volume", "brain_volume")
HEADER = "participant_id\tage\tsex\tventricular_volume\tbrain_volume\tsite"


def _config(root, **overrides):
  d = dict(data_dir=str(root), participants_tsv="", image_column="", covariates=COVARIATES)
  d.update(overrides)
  return ml_collections.ConfigDict(d)


def _touch(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  open(path, "wb").close()
  return str(path)


def _bids(root, rows, images=True):
  with open(os.path.join(root, "participants.tsv"), "w") as f:
    f.write("\n".join([HEADER] + ["\t".join(r) for r in rows]) + "\n")
  if images:
    for r in rows:
      sid = r[0] if r[0].startswith("sub-") else f"sub-{r[0]}"
      _touch(os.path.join(root, sid, "anat", f"{sid}_T1w.nii.gz"))


ROWS = [("sub-01", "50.5", "M", "20.0", "1500", "a"),
        ("sub-02", "61", "female", "35.5", "1400", "b"),
        ("03", "70", "1", "50", "1300", "a"),
        ("sub-04", "44", "f", "10", "1600", "n/a")]


def test_bids_cohort_with_sex_coding_and_extra_columns(tmp_path):
  _bids(tmp_path, ROWS)
  subjects = manifest.load_cohort(_config(tmp_path))
  assert [s.participant_id for s in subjects] == ["sub-01", "sub-02", "sub-03", "sub-04"]
  assert [s.covariates["sex"] for s in subjects] == [1.0, 0.0, 1.0, 0.0]
  assert subjects[1].covariates == {"age": 61.0, "sex": 0.0, "ventricular_volume": 35.5,
                                    "brain_volume": 1400.0}
  assert subjects[0].extra == {"site": "a"}
  assert subjects[2].image_path == str(tmp_path / "sub-03" / "anat" / "sub-03_T1w.nii.gz")


def test_session_folders_and_uncompressed_images(tmp_path):
  _bids(tmp_path, ROWS[:1], images=False)
  path = _touch(tmp_path / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_T1w.nii")
  assert manifest.load_cohort(_config(tmp_path))[0].image_path == path


def test_image_column_relative_to_tsv(tmp_path):
  table = tmp_path / "tables" / "cohort.tsv"
  os.makedirs(table.parent)
  image = _touch(tmp_path / "tables" / "imgs" / "a.nii.gz")
  table.write_text("participant_id\tage\tsex\tventricular_volume\tbrain_volume\tpath\n"
                   "sub-1\t60\tM\t10\t1000\timgs/a.nii.gz\n")
  subjects = manifest.load_cohort(_config("", participants_tsv=str(table), image_column="path"))
  assert os.path.samefile(subjects[0].image_path, image)


def test_missing_tsv(tmp_path):
  with pytest.raises(DataError, match="participants.tsv: participants table not found"):
    manifest.load_cohort(_config(tmp_path))
  with pytest.raises(ConfigError, match="data.data_dir"):
    manifest.load_cohort(_config(""))


def test_missing_column(tmp_path):
  (tmp_path / "participants.tsv").write_text("participant_id\tage\tsex\nsub-1\t60\tM\n")
  with pytest.raises(DataError, match="missing columns 'ventricular_volume', 'brain_volume'"):
    manifest.load_cohort(_config(tmp_path))


def test_every_bad_row_in_one_message(tmp_path):
  rows = [list(r) for r in ROWS]
  rows[0][2] = "X"  # unknown sex code
  rows[1][1], rows[1][3] = "sixty", "n/a"  # two problems in one row
  _bids(tmp_path, rows + [list(ROWS[3])])  # sub-04 twice
  with pytest.raises(DataError) as e:
    manifest.load_cohort(_config(tmp_path))
  lines = str(e.value).splitlines()
  assert "3 of 4 subjects have problems (4 in all)" in lines[0]
  assert "data.skip_bad_subjects=True" in lines[0]
  assert lines[1:] == ["  subject sub-01 has sex='X'; use M/F, male/female or 1/0",
                       "  subject sub-02 has non-numeric age='sixty'",
                       "  subject sub-02 has no value in column 'ventricular_volume'; fill it in "
                       "or remove the subject",
                       "  participant_id sub-04 appears twice (lines 5 and 6); keep one row"]
  cohort = manifest.read_cohort(_config(tmp_path))
  assert [s.participant_id for s in cohort.good_subjects()] == ["sub-03"]


@pytest.mark.parametrize("value,message", [("n/a", "subject sub-02 has no value in column 'age'"),
                                           ("", "subject sub-02 has no value in column 'age'"),
                                           ("sixty", "subject sub-02 has non-numeric age='sixty'")])
def test_bad_covariate_names_subject_and_column(tmp_path, value, message):
  rows = [list(r) for r in ROWS]
  rows[1][1] = value
  _bids(tmp_path, rows)
  with pytest.raises(DataError, match=message):
    manifest.load_cohort(_config(tmp_path))


def test_bad_sex_value(tmp_path):
  rows = [list(r) for r in ROWS]
  rows[0][2] = "X"
  _bids(tmp_path, rows)
  with pytest.raises(DataError, match="subject sub-01 has sex='X'"):
    manifest.load_cohort(_config(tmp_path))


def test_missing_image(tmp_path):
  _bids(tmp_path, ROWS)
  os.remove(tmp_path / "sub-02" / "anat" / "sub-02_T1w.nii.gz")
  with pytest.raises(DataError, match="subject sub-02: no image at"):
    manifest.load_cohort(_config(tmp_path))
  table = tmp_path / "with_paths.tsv"
  table.write_text("participant_id\tage\tsex\tventricular_volume\tbrain_volume\tpath\n"
                   "sub-1\t60\tM\t10\t1000\tgone.nii.gz\n")
  with pytest.raises(DataError, match="gone.nii.gz .column 'path'. not found"):
    manifest.load_cohort(_config("", participants_tsv=str(table), image_column="path"))


def test_empty_cohort_and_duplicates(tmp_path):
  _bids(tmp_path, [])
  with pytest.raises(DataError, match="has no subjects"):
    manifest.load_cohort(_config(tmp_path))
  _bids(tmp_path, [ROWS[0], ROWS[0]])
  with pytest.raises(DataError, match="sub-01 appears twice"):
    manifest.load_cohort(_config(tmp_path))


def _subjects(n):
  return [manifest.Subject(f"sub-{i:03d}", f"/x/{i}.nii.gz",
                           {"age": 44.0 + i, "sex": float(i % 2)}) for i in range(n)]


def test_split_is_deterministic_disjoint_and_order_free():
  subjects = _subjects(50)
  train, val = manifest.split_subjects(subjects, 0.2, seed=0)
  assert len(val) == 10 and len(train) == 40
  assert not {s.participant_id for s in train} & {s.participant_id for s in val}
  train2, val2 = manifest.split_subjects(subjects[::-1], 0.2, seed=0)
  assert {s.participant_id for s in val2} == {s.participant_id for s in val}
  _, val3 = manifest.split_subjects(subjects, 0.2, seed=1)
  assert {s.participant_id for s in val3} != {s.participant_id for s in val}
  assert len(manifest.split_subjects(_subjects(3), 0.1, seed=0)[1]) == 1
  with pytest.raises(DataError, match="empty"):
    manifest.split_subjects([], 0.1, seed=0)


def test_covariate_stats_normalise_round_trip():
  subjects = _subjects(5)
  st = manifest.CovariateStats.from_subjects(subjects, ("age", "sex"))
  assert st.minimum == (44.0, 0.0) and st.maximum == (48.0, 1.0)
  values = np.array([[44.0, 0.0], [46.0, 1.0], [48.0, 1.0]])
  normed = st.normalise(values)
  np.testing.assert_allclose(normed, [[0, 0], [0.5, 1], [1, 1]])
  np.testing.assert_allclose(st.denormalise(normed), values, rtol=1e-6)
  again = manifest.CovariateStats.from_json(st.to_json())
  assert again == st
  np.testing.assert_allclose(st.vector(subjects[2]), [0.5, 0.0])
  constant = manifest.CovariateStats.from_subjects(subjects[:1], ("age",))
  assert constant.normalise([[44.0]])[0, 0] == 0.0
  with pytest.raises(DataError, match="malformed"):
    manifest.CovariateStats.from_json('{"names": ["age"]}')
