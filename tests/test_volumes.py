"""Volume measurement: calibrated on synthetic subjects, checked on held-out ones (r >= 0.98)."""

import csv
import json
import os

import numpy as np
import pytest

from brain_ldm_jax.data import nifti
from brain_ldm_jax.data import synthetic
from brain_ldm_jax.metrics import volumes as V

SHAPE, SPACING = (40, 56, 40), 4.0  # the demo grid: the whole brain at 4 mm
NUM_CALIBRATION, NUM_HELD_OUT = 10, 20


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("cohort"))
  tsv = synthetic.make_cohort(out, NUM_CALIBRATION + NUM_HELD_OUT, 0, SPACING, SHAPE)
  with open(tsv) as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  images, affine = [], None
  for r in rows:
    sid = r["participant_id"]
    image, affine = nifti.load_volume(os.path.join(out, sid, "anat", f"{sid}_T1w.nii.gz"),
                                      SHAPE, SPACING)
    images.append(image)
  col = lambda c: np.array([float(r[c]) for r in rows])
  truth = dict(ventricular_volume=col("ventricular_volume"), brain_volume=col("brain_volume"))
  return np.stack(images), affine, truth, tsv


def test_calibrated_volumes_match_ground_truth_on_held_out_subjects(cohort, tmp_path):
  images, affine, truth, tsv = cohort
  raw = V.raw_measurements(images, affine)
  cal, test = slice(0, NUM_CALIBRATION), slice(NUM_CALIBRATION, None)
  quantities = V.QUANTITIES
  calibration = V.fit_calibration({q: raw[q][cal] for q in quantities},
                                  {q: truth[q][cal] for q in quantities},
                                  dict(participants_tsv=tsv), quantities)
  measured = calibration.apply({q: raw[q][test] for q in quantities})
  for q in quantities:
    fid = V.fidelity(truth[q][test], measured[q])
    print(q, fid)
    assert fid["r"] >= 0.98, (q, fid)
  assert fid["mae"] < 0.02 * truth["brain_volume"].mean()
  # JSON round trip keeps the numbers and the provenance.
  path = str(tmp_path / "calibration.json")
  calibration.save(path)
  again = V.Calibration.load(path)
  assert again.slope == calibration.slope and again.provenance["participants_tsv"] == tsv
  assert json.load(open(path))["provenance"]["num_subjects"] == NUM_CALIBRATION


def test_grid_independent_template_volumes():
  """The template measures alike at 2 and 4 mm before calibration (ventricles within 30 %: partial
  volume differs by grid, which is why a calibration belongs to one grid)."""
  t = synthetic.load_template(1.0)
  out = {}
  for spacing, shape in ((2.0, (80, 112, 80)), (4.0, SHAPE)):
    affine = nifti.mni_affine(shape, spacing)
    from scipy import ndimage
    coords = np.einsum("ij,j...->i...", (t.world_to_voxel @ affine)[:3, :3],
                       np.indices(shape, dtype=np.float64))
    coords += (t.world_to_voxel @ affine)[:3, 3, None, None, None]
    image = ndimage.map_coordinates(ndimage.gaussian_filter(t.t1, (spacing - 1) / 2), coords,
                                    order=1)
    out[spacing] = V.raw_measurements(image[None], affine, batch_size=1)
  for q in ("ventricular_volume", "brain_volume"):
    a, b = out[2.0][q][0], out[4.0][q][0]
    assert abs(a - b) < (0.3 if q == "ventricular_volume" else 0.05) * max(a, b), (q, a, b)
  assert 5 < out[2.0]["ventricular_volume"][0] < 40
