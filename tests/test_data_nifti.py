"""NIfTI loading onto the run's MNI grid: geometry, real MNI images, the MNI check, bad files."""

import gzip
import os

import nibabel as nib
import nilearn
import numpy as np
import pytest
from nibabel.testing import data_path as NIBABEL_DATA
from nilearn import image as nl_image
from scipy import ndimage

from brain_ldm_jax.data import nifti
from brain_ldm_jax.errors import DataError

MNI_T1 = os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data",
                      "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
# Colin27 in MNI space, from Debian's mricron-data (.ci/run installs it): a real T1 made elsewhere.
COLIN27 = "/usr/share/mricron/templates/ch2.nii.gz"
NATIVE = os.path.join(NIBABEL_DATA, "anatomical.nii")  # a small native-space T1 (LAS, 2 mm)
GRID = ((40, 56, 40), 4.0)


def _write(path, data, affine, code=1):
  img = nib.Nifti1Image(np.asarray(data), affine)
  img.set_sform(affine, code=code)
  img.set_qform(affine, code=code)
  nib.save(img, str(path))
  return str(path)


def _world(affine, ijk):
  return (np.asarray(affine)[:3, :3] @ np.asarray(ijk, float).T).T + np.asarray(affine)[:3, 3]


def _rotation(angles):
  ax, ay, az = angles
  rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
  ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
  rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
  return rx @ ry @ rz


def _reference(path, shape, spacing):
  """The source low-passed as the loader does, sampled at the grid's world points by nilearn."""
  img = nib.load(path)
  step = spacing / nifti.voxel_sizes(img.affine)
  smooth = ndimage.gaussian_filter(img.get_fdata(), nifti.antialias_sigma(step), mode="nearest")
  return nl_image.resample_img(nib.Nifti1Image(smooth, img.affine),
                               target_affine=nifti.mni_affine(shape, spacing),
                               target_shape=shape, interpolation="linear", fill_value=0,
                               force_resample=True, copy_header=True).get_fdata()


@pytest.mark.parametrize("axes,signs", [((0, 1, 2), (-1, -1, 1)),  # LPS
                                         ((2, 0, 1), (1, -1, 1)),  # permuted + flipped
                                         ((1, 2, 0), (-1, 1, -1))])
def test_marker_voxel_lands_at_its_world_position_on_the_grid(tmp_path, axes, signs):
  linear = np.zeros((3, 3))
  for col, (row, sign) in enumerate(zip(axes, signs)):
    linear[row, col] = 2.0 * sign
  affine = np.eye(4)
  affine[:3, :3] = linear
  affine[:3, 3] = [5.0, -8.0, 4.0]  # voxel centres on the 2 mm MNI grid's
  data = np.zeros((12, 14, 10), np.float32)
  marker = (3, 9, 2)
  data[marker] = 10.0
  path = _write(tmp_path / "odd.nii.gz", data, affine)
  shape = (16, 16, 20)
  out, out_affine = nifti.load_volume(path, shape, 2.0, clip_percentiles=None, assume_mni=True)
  np.testing.assert_array_equal(out_affine, nifti.mni_affine(shape, 2.0))
  found = np.unravel_index(np.argmax(out), out.shape)
  np.testing.assert_allclose(_world(out_affine, [found]), _world(affine, [marker]), atol=1e-6)
  assert out[found] == 1.0 and np.count_nonzero(out) == 1


@pytest.mark.parametrize("zooms,angles,spacing", [((1.0, 1.5, 2.5), (0.0, 0.0, 0.0), 2.0),
                                                   ((1.2, 1.2, 3.0), (0.15, -0.1, 0.2), 1.5),
                                                   ((-2.0, 1.0, 1.0), (0.0, 0.3, 0.0), 2.0)])
def test_one_interpolation_reproduces_world_coordinates(tmp_path, zooms, angles, spacing):
  # A linear function of world coordinates is reproduced exactly by linear interpolation, so the
  # output at each grid voxel must equal that function at the voxel's world position.
  shape = (30, 24, 14)
  affine = np.eye(4)
  affine[:3, :3] = _rotation(angles) @ np.diag(zooms)
  affine[:3, 3] = np.asarray(nifti.MNI_BRAIN_CENTRE) - affine[:3, :3] @ (np.array(shape) - 1) / 2
  ijk = np.indices(shape).reshape(3, -1).T
  coef = np.array([0.3, -0.2, 0.5])
  data = (_world(affine, ijk) @ coef).reshape(shape).astype(np.float32)
  path = _write(tmp_path / "oblique.nii", data, affine)
  out_shape = (20, 22, 18)
  out, out_affine = nifti.load_volume(path, out_shape, spacing, clip_percentiles=None,
                                      assume_mni=True)
  assert out.shape == out_shape and out.dtype == np.float32
  np.testing.assert_array_equal(out_affine, nifti.mni_affine(out_shape, spacing))
  out_ijk = np.indices(out_shape).reshape(3, -1).T
  expected = _world(out_affine, out_ijk) @ coef
  src_ijk = _world(np.linalg.inv(affine), _world(out_affine, out_ijk))
  # Away from the edge (the anti-aliasing filter reads the edge there) and outside the FOV.
  interior = np.all((src_ijk > 2) & (src_ijk < np.array(shape) - 3), axis=1)
  outside = np.any((src_ijk < -0.01) | (src_ijk > np.array(shape) - 0.99), axis=1)
  assert interior.sum() > 200 and outside.sum() > 200
  got = out.reshape(-1)
  a, b = np.polyfit(expected[interior], got[interior], 1)
  np.testing.assert_allclose(got[interior], a * expected[interior] + b, atol=2e-4)
  assert a > 0
  assert np.all(got[outside] == 0.0)  # background outside the source's field of view


def test_fields_of_view_and_orientations_land_on_the_same_grid(tmp_path):
  # The same MNI brain as a UK-Biobank-like 182x218x182 crop, flipped to LAS, and at 2 mm: all
  # must load to the same volume on the grid (the old central crop moved each by its FOV).
  img = nib.load(MNI_T1)
  data, affine = img.get_fdata().astype(np.float32), img.affine
  crop = data[8:190, 8:226, 2:184]
  crop_affine = affine.copy()
  crop_affine[:3, 3] = _world(affine, [[8, 8, 2]])[0]
  las_affine = affine @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0],
                                  [0, 0, 0, 1]])
  coarse_affine = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
  paths = [MNI_T1,
           _write(tmp_path / "ukb.nii.gz", crop, crop_affine, code=2),
           _write(tmp_path / "las.nii.gz", data[::-1], las_affine, code=4),
           _write(tmp_path / "2mm.nii.gz", data[::2, ::2, ::2], coarse_affine, code=2)]
  vols = [nifti.load_volume(p, *GRID)[0] for p in paths]
  np.testing.assert_allclose(vols[2], vols[0], atol=1e-5)
  # The crop misses the grid's outermost 1-2 mm and the 2 mm copy is coarser: nearly equal.
  for vol in (vols[1], vols[3]):
    assert np.corrcoef(vol.ravel(), vols[0].ravel())[0, 1] > 0.995


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_whole_and_fractional_voxel_offsets_equal_an_independent_resampling(tmp_path, shift):
  # A 1 mm file on the 1 mm grid's voxel centres is copied, one half a voxel off is interpolated:
  # both must equal nilearn's linear resampling at the grid's world points.
  shape = (36, 40, 34)
  grid = nifti.mni_affine(shape, 1.0)
  affine = grid.copy()
  affine[:3, 3] += np.array([4.0, 6.0, 3.0]) + shift  # inside the grid, not at its corner
  data = np.random.default_rng(3).random((26, 28, 24)).astype(np.float32)
  path = _write(tmp_path / "x.nii.gz", data, affine)
  out, _ = nifti.load_volume(path, shape, 1.0, clip_percentiles=None, assume_mni=True)
  ref = nl_image.resample_img(nib.load(path), target_affine=grid, target_shape=shape,
                              interpolation="linear", fill_value=np.nan, force_resample=True,
                              copy_header=True).get_fdata()
  inside = ~np.isnan(ref)
  np.testing.assert_array_equal(out[~inside], 0.0)
  lo, hi = ref[inside].min(), ref[inside].max()
  np.testing.assert_allclose(out[inside], (ref[inside] - lo) / (hi - lo), atol=1e-5)


def test_real_mni_template_equals_the_source_sampled_at_the_grid():
  out, affine = nifti.load_volume(MNI_T1, *GRID)
  np.testing.assert_array_equal(affine, nifti.mni_affine(*GRID))
  assert out.shape == GRID[0] and 0.0 <= out.min() and out.max() <= 1.0
  assert np.corrcoef(out.ravel(), _reference(MNI_T1, *GRID).ravel())[0, 1] > 0.999
  # The head is inside the grid: the border slabs are nearly empty, the centre is not.
  assert out[:2].mean() < 0.05 and out[-2:].mean() < 0.05 and out[20, 28, 20] > 0.2


def test_colin27_equals_the_source_sampled_at_the_grid():
  # Fails (never skips) without the file: .ci/run installs Debian's mricron-data.
  assert os.path.exists(COLIN27), f"{COLIN27} missing: apt-get install mricron-data"
  out, _ = nifti.load_volume(COLIN27, *GRID)
  assert np.corrcoef(out.ravel(), _reference(COLIN27, *GRID).ravel())[0, 1] > 0.999


def test_native_space_image_is_refused_with_what_to_do():
  with pytest.raises(DataError) as e:
    nifti.load_volume(NATIVE, *GRID)
  message = str(e.value)
  assert message.startswith(f"{NATIVE}: does not look like an image in MNI space")
  assert "flirt" in message and "ANTs" in message and "data.assume_mni=True" in message
  out, _ = nifti.load_volume(NATIVE, *GRID, assume_mni=True)
  assert out.shape == GRID[0] and out.max() == 1.0


def test_misplaced_brain_is_refused_by_its_foreground_centre(tmp_path):
  img = nib.load(MNI_T1)
  affine = img.affine.copy()
  affine[2, 3] += 40.0  # the whole head 40 mm up: the FOV still covers most of the grid
  path = _write(tmp_path / "up.nii.gz", img.get_fdata().astype(np.float32), affine, code=2)
  with pytest.raises(DataError, match=r"up.nii.gz: .*foreground is centred .* 4\d mm from"):
    nifti.load_volume(path, *GRID)


@pytest.mark.parametrize("code,what", [(0, "no sform or qform"), (3, "Talairach")])
def test_codes_that_are_not_mni_are_refused(tmp_path, code, what):
  img = nib.load(MNI_T1)
  path = _write(tmp_path / "x.nii.gz", img.get_fdata().astype(np.float32), img.affine, code=code)
  with pytest.raises(DataError, match=f"x.nii.gz: does not look .*{what}"):
    nifti.load_volume(path, *GRID)


def test_save_volume_round_trip_is_exact_on_the_grid(tmp_path):
  vol, affine = nifti.load_volume(MNI_T1, *GRID)
  path = nifti.save_volume(str(tmp_path / "sub" / "out.nii.gz"), vol, affine)
  img = nib.load(path)
  np.testing.assert_allclose(img.affine, affine, atol=1e-5)
  np.testing.assert_allclose(img.get_fdata(), vol, atol=1e-6)
  assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
  assert os.listdir(tmp_path / "sub") == ["out.nii.gz"]  # no temp file left behind
  # Loading what we wrote onto the same grid interpolates nothing.
  again, again_affine = nifti.load_volume(path, *GRID, clip_percentiles=None)
  np.testing.assert_array_equal(again_affine, affine)
  np.testing.assert_allclose(again, (vol - vol.min()) / (vol.max() - vol.min()), atol=1e-6)


def test_save_volume_int16_and_mni_code(tmp_path):
  vol = np.linspace(0, 1, 8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
  path = nifti.save_volume(str(tmp_path / "x.nii.gz"), vol, nifti.mni_affine((8, 8, 8), 2.0),
                           dtype="int16", mni=True)
  img = nib.load(path)
  assert img.get_data_dtype() == np.int16 and int(img.header["sform_code"]) == 4
  np.testing.assert_allclose(img.get_fdata(), vol, atol=1e-4)


@pytest.mark.parametrize("spacing", [1.0, 2.0, 4.0])
def test_noise_gain_is_what_resampling_leaves_of_white_noise(spacing):
  noise = np.random.default_rng(0).standard_normal((96, 96, 96)).astype(np.float32)
  grid = np.diag([spacing, spacing, spacing, 1.0])
  grid[:3, 3] = 8.0  # away from the edges, where "nearest" padding repeats voxels
  n = int(80 / spacing)
  out = nifti.resample_to_grid(noise, np.eye(4), (n, n, n), grid)
  assert out.std() == pytest.approx(nifti.antialias_noise_gain(spacing), rel=0.1)


def test_intensity_scaling_is_robust_to_outliers(tmp_path):
  rng = np.random.default_rng(0)
  data = rng.normal(100, 10, (20, 20, 20)).astype(np.float32)
  data[0, 0, 0] = 1e6  # a hot voxel must not squash the rest
  path = _write(tmp_path / "hot.nii.gz", data, nifti.mni_affine((20, 20, 20), 1.0))
  out, _ = nifti.load_volume(path, (20, 20, 20), 1.0)
  assert out.min() == 0.0 and out.max() == 1.0
  assert 0.4 < np.median(out) < 0.6


def _on_grid(tmp_path, data, name="x.nii"):
  return _write(tmp_path / name, data, nifti.mni_affine(np.shape(data)[:3], 1.0))


def test_singleton_fourth_dimension_is_squeezed(tmp_path):
  data = np.random.default_rng(1).random((8, 9, 10, 1)).astype(np.float32)
  out, _ = nifti.load_volume(_on_grid(tmp_path, data), (8, 9, 10), 1.0)
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
  path = _on_grid(tmp_path, np.random.default_rng(2).random((20, 20, 20)), "cut.nii.gz")
  blob = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(blob[:len(blob) // 2])
  with pytest.raises(DataError, match="cut.nii.gz: truncated or corrupt"):
    nifti.load_volume(path, (8, 8, 8), 1.0)


def test_four_d_and_two_d_rejected(tmp_path):
  with pytest.raises(DataError, match=r"example4d.nii.gz: is 4D"):
    nifti.load_volume(os.path.join(NIBABEL_DATA, "example4d.nii.gz"), (8, 8, 8), 1.0)
  with pytest.raises(DataError, match=r"flat.nii: has shape \(8, 8, 1\); a 3D volume"):
    nifti.load_volume(_write(tmp_path / "flat.nii", np.ones((8, 8, 1)), np.eye(4)), (8, 8, 8), 1.0)


def test_zero_voxel_size_rejected(tmp_path):
  img = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), None)
  img.header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=2)  # a qform cannot be singular
  path = str(tmp_path / "flat.nii")
  nib.save(img, path)
  with pytest.raises(DataError, match=r"flat.nii: has voxel sizes \[1.0, 1.0, 0.0\] mm"):
    nifti.load_volume(path, (8, 8, 8), 1.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels_rejected(tmp_path, bad):
  data = np.ones((6, 6, 6), np.float32)
  data[2, 3, 4] = bad
  with pytest.raises(DataError, match="x.nii: has 1 NaN/Inf voxels"):
    nifti.load_volume(_on_grid(tmp_path, data), (6, 6, 6), 1.0)


def test_constant_image_rejected(tmp_path):
  with pytest.raises(DataError, match="x.nii: has no intensity range"):
    nifti.load_volume(_on_grid(tmp_path, np.full((6, 6, 6), 3.0)), (6, 6, 6), 1.0)
