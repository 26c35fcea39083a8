"""NIfTI loading/preprocessing: orientation, resampling, crop/pad, scaling, affines, bad files."""

import gzip
import os

import nibabel as nib
import nilearn
import numpy as np
import pytest
from nibabel.testing import data_path as NIBABEL_DATA

from brain_ldm_jax.data import nifti
from brain_ldm_jax.errors import DataError

MNI_T1 = os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data",
                      "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")


def _write(path, data, affine):
  nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
  return str(path)


def _world(affine, ijk):
  return (np.asarray(affine)[:3, :3] @ np.asarray(ijk, float).T).T + np.asarray(affine)[:3, 3]


def _rotation(angles):
  ax, ay, az = angles
  rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
  ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
  rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
  return rx @ ry @ rz


@pytest.mark.parametrize("axes,signs", [((0, 1, 2), (-1, -1, 1)),  # LPS
                                         ((2, 0, 1), (1, -1, 1)),  # permuted + flipped
                                         ((1, 2, 0), (-1, 1, -1))])
def test_marker_voxel_lands_where_ras_says(tmp_path, axes, signs):
  shape = (12, 14, 10)
  linear = np.zeros((3, 3))
  for col, (row, sign) in enumerate(zip(axes, signs)):
    linear[row, col] = 2.0 * sign
  affine = np.eye(4)
  affine[:3, :3] = linear
  affine[:3, 3] = [5.0, -7.0, 3.0]
  data = np.zeros(shape, np.float32)
  marker = (3, 9, 2)
  data[marker] = 10.0
  path = _write(tmp_path / "odd.nii.gz", data, affine)
  out, out_affine = nifti.load_volume(path, shape=(16, 16, 16), spacing=2.0, clip_percentiles=None)
  # RAS+: the affine's linear part is a positive diagonal.
  np.testing.assert_allclose(out_affine[:3, :3], np.diag([2.0, 2.0, 2.0]))
  found = np.unravel_index(np.argmax(out), out.shape)
  np.testing.assert_allclose(_world(out_affine, [found]), _world(affine, [marker]), atol=1e-6)
  assert out[found] == 1.0 and np.count_nonzero(out) == 1


@pytest.mark.parametrize("zooms,angles,spacing", [((1.0, 1.5, 2.5), (0.0, 0.0, 0.0), 2.0),
                                                   ((1.2, 1.2, 3.0), (0.15, -0.1, 0.2), 1.5),
                                                   ((-2.0, 1.0, 1.0), (0.0, 0.3, 0.0), 2.0)])
def test_world_coordinates_survive_resampling_crop_and_pad(tmp_path, zooms, angles, spacing):
  # A linear function of world coordinates is reproduced exactly by linear interpolation, so the
  # output at each voxel must equal that function at the voxel's world position (returned affine).
  shape = (30, 24, 14)
  affine = np.eye(4)
  affine[:3, :3] = _rotation(angles) @ np.diag(zooms)
  affine[:3, 3] = [-20.0, 10.0, -5.0]
  ijk = np.indices(shape).reshape(3, -1).T
  coef = np.array([0.3, -0.2, 0.5])
  data = (_world(affine, ijk) @ coef).reshape(shape).astype(np.float32)
  path = _write(tmp_path / "oblique.nii", data, affine)
  out_shape = (20, 22, 18)
  out, out_affine = nifti.load_volume(path, out_shape, spacing, clip_percentiles=None)
  assert out.shape == out_shape and out.dtype == np.float32
  np.testing.assert_allclose(nifti.voxel_sizes(out_affine), spacing, rtol=1e-6)
  # Interior voxels (away from the field of view's edge and the zero padding).
  out_ijk = np.indices(out_shape).reshape(3, -1).T
  expected = _world(out_affine, out_ijk) @ coef
  src_ijk = _world(np.linalg.inv(affine), _world(out_affine, out_ijk))
  interior = np.all((src_ijk > 2) & (src_ijk < np.array(shape) - 3), axis=1)
  assert interior.sum() > 200
  got = out.reshape(-1)[interior]
  a, b = np.polyfit(expected[interior], got, 1)
  np.testing.assert_allclose(got, a * expected[interior] + b, atol=2e-4)
  assert a > 0


def test_save_volume_round_trip_keeps_affine_and_data(tmp_path):
  vol, affine = nifti.load_volume(os.path.join(NIBABEL_DATA, "anatomical.nii"), (32, 40, 24), 2.0)
  path = nifti.save_volume(str(tmp_path / "sub" / "out.nii.gz"), vol, affine)
  img = nib.load(path)
  np.testing.assert_allclose(img.affine, affine, atol=1e-5)
  np.testing.assert_allclose(img.get_fdata(), vol, atol=1e-6)
  assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
  assert os.listdir(tmp_path / "sub") == ["out.nii.gz"]  # no temp file left behind
  # Loading what we wrote at the same grid and spacing changes nothing but the intensity scale.
  again, again_affine = nifti.load_volume(path, vol.shape, 2.0, clip_percentiles=None)
  np.testing.assert_allclose(again_affine, affine, atol=1e-5)
  np.testing.assert_allclose(again, (vol - vol.min()) / (vol.max() - vol.min()), atol=1e-5)


def test_save_volume_int16_and_mni_code(tmp_path):
  vol = np.linspace(0, 1, 8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
  path = nifti.save_volume(str(tmp_path / "x.nii.gz"), vol, nifti.mni_affine((8, 8, 8), 2.0),
                           dtype="int16", mni=True)
  img = nib.load(path)
  assert img.get_data_dtype() == np.int16 and int(img.header["sform_code"]) == 4
  np.testing.assert_allclose(img.get_fdata(), vol, atol=1e-4)


def test_crop_or_pad_is_central_and_moves_the_origin():
  data = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
  out, affine = nifti.crop_or_pad(data, np.eye(4), (4, 7, 4))
  np.testing.assert_array_equal(out[:, 1:6, :], data[1:5, :, :])
  assert np.all(out[:, 0] == 0) and np.all(out[:, 6] == 0)
  np.testing.assert_array_equal(affine[:3, 3], [1, -1, 0])  # out voxel 0 = in voxel (1, -1, 0)


def test_intensity_scaling_is_robust_to_outliers(tmp_path):
  rng = np.random.default_rng(0)
  data = rng.normal(100, 10, (20, 20, 20)).astype(np.float32)
  data[0, 0, 0] = 1e6  # a hot voxel must not squash the rest
  path = _write(tmp_path / "hot.nii.gz", data, np.eye(4))
  out, _ = nifti.load_volume(path, (20, 20, 20), 1.0)
  assert out.min() == 0.0 and out.max() == 1.0
  assert 0.4 < np.median(out) < 0.6


def test_real_template_at_4mm_is_in_mni_box():
  out, affine = nifti.load_volume(MNI_T1, (40, 56, 40), 4.0)
  assert out.shape == (40, 56, 40) and 0.0 <= out.min() and out.max() <= 1.0
  np.testing.assert_allclose(nifti.voxel_sizes(affine), 4.0)
  # The head is inside the grid: the border slabs are nearly empty, the centre is not.
  assert out[:2].mean() < 0.05 and out[-2:].mean() < 0.05 and out[20, 28, 20] > 0.2
  box = nifti.mni_affine((40, 56, 40), 4.0)
  centre = _world(box, [np.array([39, 55, 39]) / 2])[0]
  np.testing.assert_allclose(centre, nifti.MNI_BRAIN_CENTRE, atol=2.0)


def test_singleton_fourth_dimension_is_squeezed(tmp_path):
  data = np.random.default_rng(1).random((8, 9, 10, 1)).astype(np.float32)
  out, _ = nifti.load_volume(_write(tmp_path / "x.nii", data, np.eye(4)), (8, 9, 10), 1.0)
  assert out.shape == (8, 9, 10)


def test_missing_file(tmp_path):
  with pytest.raises(DataError, match="nope.nii.gz: file not found"):
    nifti.load_volume(str(tmp_path / "nope.nii.gz"), (8, 8, 8), 1.0)


def test_non_nifti_files(tmp_path):
  text = tmp_path / "notes.nii.gz"
  text.write_bytes(gzip.compress(b"this is not an image"))
  with pytest.raises(DataError, match="notes.nii.gz: not a readable NIfTI"):
    nifti.load_volume(str(text), (8, 8, 8), 1.0)
  mgz = os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data", "test.mgz")
  with pytest.raises(DataError, match="test.mgz: is a MGHImage, not NIfTI"):
    nifti.load_volume(mgz, (8, 8, 8), 1.0)


def test_truncated_file(tmp_path):
  path = _write(tmp_path / "cut.nii.gz", np.random.default_rng(2).random((20, 20, 20)), np.eye(4))
  blob = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(blob[:len(blob) // 2])
  with pytest.raises(DataError, match="cut.nii.gz: truncated or corrupt"):
    nifti.load_volume(path, (8, 8, 8), 1.0)


def test_four_d_rejected():
  with pytest.raises(DataError, match=r"example4d.nii.gz: is 4D"):
    nifti.load_volume(os.path.join(NIBABEL_DATA, "example4d.nii.gz"), (8, 8, 8), 1.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels_rejected(tmp_path, bad):
  data = np.ones((6, 6, 6), np.float32)
  data[2, 3, 4] = bad
  with pytest.raises(DataError, match="x.nii: has 1 NaN/Inf voxels"):
    nifti.load_volume(_write(tmp_path / "x.nii", data, np.eye(4)), (6, 6, 6), 1.0)
