"""NIfTI I/O and the preprocessing every volume goes through (nibabel + scipy).

`load_volume` puts any 3D NIfTI of a brain in MNI space onto the run's grid, `mni_affine(shape,
spacing)`: one linear interpolation from the source array, by the source's own affine (whatever its
orientation, voxel size or field of view), then intensities robustly scaled to [0, 1]. The affine it
returns is the grid's, so every volume of a run (training, evaluation, samples) shares one world
grid and `save_volume(path, *load_volume(...))` overlays the source in any viewer.

Images that are plainly not in MNI space are refused (`mni_problem`, `foreground_problem`) with a
message that says to register them first; `data.assume_mni` accepts them as they are.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from brain_ldm_jax import files
from brain_ldm_jax.errors import DataError

# Centre (mm) of the MNI152 brain's bounding box (nilearn's 2009a brain mask), so a grid centred
# here holds the whole brain (mask bounding box x -72..72, y -107..73, z -72..82 mm).
MNI_BRAIN_CENTRE = (0.0, -17.0, 5.0)
MNI_BRAIN_BOX = ((-72.0, 72.0), (-107.0, 73.0), (-72.0, 82.0))

# NIfTI xform codes.
XFORM_UNKNOWN, XFORM_SCANNER, XFORM_ALIGNED, XFORM_TALAIRACH, XFORM_MNI, XFORM_TEMPLATE = range(6)
XFORM_NAMES = {0: "unknown", 1: "scanner", 2: "aligned", 3: "Talairach", 4: "MNI152",
               5: "template"}

# An image counts as in MNI space unless it plainly is not. Registered images often carry code 1
# or 2 (nilearn's MNI152 template: 2, Colin27's high-resolution copy: 1), so those codes pass and
# the image's content decides: its field of view must hold most of the brain's part of the run's
# grid, and its foreground's centre must lie near the MNI brain's (4-7 mm for the MNI152 and
# Colin27 T1s, with or without skull: docs/data_loading.md).
MIN_BRAIN_COVERAGE = 0.5
MAX_CENTRE_OFFSET_MM = 25.0
# Voxel sizes outside this range (mm) are header errors, not images.
VOXEL_SIZE_RANGE = (0.05, 20.0)

REGISTER_HINT = ("register it to MNI152 first (e.g. FSL flirt -ref MNI152_T1_1mm_brain, or ANTs "
                 "antsRegistrationSyN.sh), or set data.assume_mni=True to use it as it is")


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
  """Voxel edge lengths (mm) along the array axes of `affine` (works for oblique affines)."""
  return np.sqrt(np.sum(np.asarray(affine)[:3, :3] ** 2, axis=0))


def mni_affine(shape: Sequence[int], spacing: float) -> np.ndarray:
  """RAS+ affine of a `shape` grid at `spacing` mm centred on the MNI152 brain box.

  The translation is rounded to whole mm so that at 1 mm the grid shares voxel centres with the
  1 mm MNI templates (loading them onto it interpolates nothing).
  """
  shape = np.asarray(shape, dtype=np.float64)
  origin = np.round(np.asarray(MNI_BRAIN_CENTRE) - spacing * (shape - 1) / 2)
  affine = np.diag([spacing, spacing, spacing, 1.0])
  affine[:3, 3] = origin
  return affine


def _apply(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
  """(n, 3) points through a 4x4 affine."""
  return points @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


# ----------------------------------------------------------------------------- headers


def read_image(path: str) -> nib.Nifti1Image:
  """The NIfTI image object of `path` (header only: nibabel reads voxels on access)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise DataError(f"{path}: file not found")
  try:
    img = nib.load(path)
  except Exception as e:  # nibabel raises many types for foreign / broken files
    raise DataError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e}); "
                    "convert it to .nii or .nii.gz") from e
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise DataError(f"{path}: is a {type(img).__name__}, not NIfTI; convert it to .nii.gz "
                    "(e.g. with nibabel or dcm2niix)")
  return img


def shape_problem(shape: Sequence[int]) -> str | None:
  """Why an image of this array shape is not one 3D volume (X×Y×Z, or X×Y×Z×1), or None."""
  shape = tuple(int(n) for n in shape)
  if len(shape) < 3 or any(n < 2 for n in shape[:3]):
    return f"has shape {shape}; a 3D volume is needed"
  if any(n != 1 for n in shape[3:]):
    return (f"is {len(shape)}D with shape {shape}; a single 3D volume is needed (split the "
            "series, e.g. nibabel.funcs.four_to_three)")
  return None


def affine_problem(affine: np.ndarray) -> str | None:
  """Why this voxel-to-world affine cannot place an image (zero, absurd or singular), or None."""
  affine = np.asarray(affine, np.float64)
  if not np.all(np.isfinite(affine)):
    return "has a non-finite affine; fix the header (sform/qform)"
  sizes = voxel_sizes(affine)
  lo, hi = VOXEL_SIZE_RANGE
  if np.any(sizes < lo) or np.any(sizes > hi) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
    return (f"has voxel sizes {np.round(sizes, 4).tolist()} mm (outside {lo}-{hi} mm, or a "
            "singular affine); fix the header's pixdim / sform")
  return None


def xform_code(header) -> int:
  """The code of the affine nibabel uses: the sform's when set, else the qform's."""
  sform = int(header["sform_code"])
  return sform if sform > 0 else int(header["qform_code"])


def brain_coverage(shape: Sequence[int], affine: np.ndarray, grid_shape: Sequence[int],
                   grid_affine: np.ndarray, step_mm: float = 8.0) -> float:
  """Fraction of the grid's part of the MNI brain box that lies inside the image's field of view.

  Measured on a lattice of points `step_mm` apart, so it costs nothing next to loading a volume.
  """
  grid_lo = _apply(grid_affine, np.zeros((1, 3)))[0]
  grid_hi = _apply(grid_affine, np.asarray(grid_shape, np.float64)[None] - 1)[0]
  box = np.asarray(MNI_BRAIN_BOX)
  lo = np.maximum(box[:, 0], np.minimum(grid_lo, grid_hi))
  hi = np.minimum(box[:, 1], np.maximum(grid_lo, grid_hi))
  if np.any(hi <= lo):
    return 0.0
  axes = [np.linspace(a, b, max(2, int(np.ceil((b - a) / step_mm)) + 1)) for a, b in zip(lo, hi)]
  points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
  ijk = _apply(np.linalg.inv(affine), points)
  inside = np.all((ijk > -0.5) & (ijk < np.asarray(shape[:3], np.float64) - 0.5), axis=1)
  return float(inside.mean())


def mni_problem(header, shape: Sequence[int], affine: np.ndarray, grid_shape: Sequence[int],
                grid_affine: np.ndarray) -> str | None:
  """Why an image is plainly not in MNI space, from its header alone; None when it may be."""
  code = xform_code(header)
  if code == XFORM_UNKNOWN:
    return "has no sform or qform (codes 0): its position in space is unknown"
  if code == XFORM_TALAIRACH:
    return "is in Talairach space (xform code 3), not MNI"
  coverage = brain_coverage(shape, affine, grid_shape, grid_affine)
  if coverage < MIN_BRAIN_COVERAGE:
    return (f"its field of view holds only {coverage:.0%} of the MNI brain's part of the run's "
            f"grid ({XFORM_NAMES.get(code, code)} coordinates, xform code {code})")
  return None


def foreground_centre(data: np.ndarray, affine: np.ndarray) -> np.ndarray | None:
  """World position (mm) of the centre of the voxels brighter than the image's mean, if any.

  Read on a ~4 mm subsample: enough for a centre, and cheap next to the interpolation.
  """
  stride = tuple(max(1, int(4.0 // s)) for s in voxel_sizes(affine))
  sub = data[::stride[0], ::stride[1], ::stride[2]]
  ijk = np.argwhere(sub > sub.mean())
  if len(ijk) == 0:
    return None
  return _apply(affine, ijk.mean(0, keepdims=True) * np.asarray(stride))[0]


def foreground_problem(data: np.ndarray, affine: np.ndarray) -> str | None:
  """Why an image's content is plainly not a brain in MNI space (its centre is far off), or None.

  An image without foreground passes: the intensity scaling refuses it as empty.
  """
  centre = foreground_centre(data, affine)
  if centre is None:
    return None
  offset = float(np.linalg.norm(centre - np.asarray(MNI_BRAIN_CENTRE)))
  if offset > MAX_CENTRE_OFFSET_MM:
    return (f"its foreground is centred at {np.round(centre).tolist()} mm, {offset:.0f} mm from "
            f"the MNI brain's centre {list(MNI_BRAIN_CENTRE)}")
  return None


def not_mni_message(problem: str) -> str:
  """What the user reads about an image that is not in MNI space, and what to do."""
  return f"does not look like an image in MNI space: {problem}; {REGISTER_HINT}"


# ----------------------------------------------------------------------------- voxels


def _read(path: str, img: nib.Nifti1Image) -> np.ndarray:
  """The image's voxels as float32 (X, Y, Z); DataError naming the file for anything bad."""
  try:
    data = np.asarray(img.dataobj, dtype=np.float32)
  except (EOFError, OSError, ValueError, zlib.error) as e:
    raise DataError(f"{path}: truncated or corrupt image data ({type(e).__name__}: {e}); "
                    "re-export or re-download the file") from e
  data = data.reshape(data.shape[:3])
  if not np.all(np.isfinite(data)):
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    raise DataError(f"{path}: has {bad} NaN/Inf voxels; fix or mask them before training")
  return data


def antialias_sigma(step: np.ndarray | float) -> np.ndarray:
  """Gaussian sigma (source voxels) before sampling every `step` source voxels (scikit-image's)."""
  return np.maximum(0.0, (np.asarray(step, np.float64) - 1.0) / 2.0)


def antialias_noise_gain(step: float) -> float:
  """How much the anti-aliasing filter before sampling every `step` voxels (on each axis) scales
  the standard deviation of white noise: the 3D product of each axis's sqrt(sum of taps^2)."""
  sigma = float(antialias_sigma(step))
  if sigma == 0.0:
    return 1.0
  delta = np.zeros(2 * int(np.ceil(4.0 * sigma)) + 1)  # gaussian_filter's default truncate=4
  delta[delta.size // 2] = 1.0
  taps = ndimage.gaussian_filter1d(delta, sigma, mode="constant")
  return float(np.sum(taps**2)) ** 1.5


def resample_to_grid(data: np.ndarray, affine: np.ndarray, grid_shape: Sequence[int],
                     grid_affine: np.ndarray) -> np.ndarray:
  """`data` (voxel-to-world `affine`) sampled linearly at the grid's voxel centres; NaN outside.

  One interpolation: grid voxel -> world -> source voxel. A source finer than the grid is low-pass
  filtered first (anti-aliasing). Grid voxels beyond the source's outermost voxel centres are NaN:
  outside its field of view.
  """
  grid_to_source = np.linalg.inv(affine) @ np.asarray(grid_affine, np.float64)
  # Rounding in the inverse would put a grid that shares voxel centres with the source 1e-13
  # voxels outside its first or last slice, which then reads as outside the field of view.
  snapped = np.round(grid_to_source)
  grid_to_source = np.where(np.abs(grid_to_source - snapped) < 1e-6, snapped, grid_to_source)
  # Source voxels per grid voxel along each source axis.
  step = voxel_sizes(grid_to_source[:3, :3].T)
  sigma = antialias_sigma(step)
  if np.any(sigma > 0):
    data = ndimage.gaussian_filter(data, sigma, mode="nearest")
  grid_shape = tuple(int(n) for n in grid_shape)
  if np.array_equal(grid_to_source[:3, :3], np.eye(3)) and np.all(
      grid_to_source[:3, 3] == np.round(grid_to_source[:3, 3])):
    # The grid's voxels are source voxels (UK Biobank's and Colin27's 1 mm MNI files onto a 1 mm
    # grid): interpolating there reads the voxels themselves, so copy them.
    return _shifted(data, grid_to_source[:3, 3].astype(int), grid_shape)
  if data.flags.f_contiguous and not data.flags.c_contiguous:
    # nibabel's arrays are Fortran-ordered and scipy reads in C order (4x slower across the
    # grain): sample the transposed view, axes reversed on both sides, and transpose back.
    reverse = np.eye(4)[[2, 1, 0, 3]]
    return _sample(data.T, reverse @ grid_to_source @ reverse, grid_shape[::-1]).T
  return _sample(data, grid_to_source, grid_shape)


def _shifted(data: np.ndarray, start: np.ndarray, grid_shape) -> np.ndarray:
  """Grid voxel v is source voxel start + v; NaN where that is outside `data`."""
  out = np.full(grid_shape, np.nan, np.float32)
  lo = np.clip(start, 0, data.shape)
  hi = np.clip(start + np.asarray(grid_shape), 0, data.shape)
  if np.all(hi > lo):
    out[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))] = data[
        tuple(slice(a, b) for a, b in zip(lo, hi))]
  return out


def _sample(data: np.ndarray, grid_to_source: np.ndarray, grid_shape) -> np.ndarray:
  """Linear interpolation at grid_to_source @ (grid voxel), NaN outside `data`."""
  matrix = grid_to_source[:3, :3]
  if np.count_nonzero(matrix - np.diag(np.diag(matrix))) == 0:
    matrix = np.diag(matrix)  # axis-aligned (every RAS+ MNI image): scipy's faster zoom path
  out = ndimage.affine_transform(data, matrix, offset=grid_to_source[:3, 3],
                                 output_shape=grid_shape, order=1, mode="constant", cval=np.nan)
  return out.astype(np.float32, copy=False)


# Percentiles are read on at least this many voxels of the grid (a strided subset of larger
# grids: at the paper grid every 8th voxel, 717k of them, so each 0.5 % tail still holds 3,500
# voxels, for an 8x smaller sort).
PERCENTILE_VOXELS = 500_000


def intensity_range(volume: np.ndarray, clip_percentiles: Sequence[float] | None,
                    path: str = "volume") -> tuple[float, float]:
  """(low, high) intensities of the non-NaN voxels: the given percentiles, or min/max (None)."""
  stride = max(1, int((volume.size / PERCENTILE_VOXELS) ** (1 / 3)))
  values = volume[::stride, ::stride, ::stride].ravel()
  values = values[~np.isnan(values)]
  if values.size == 0:  # a field of view that only grazes the grid
    values = volume[~np.isnan(volume)]
  if clip_percentiles is None:
    lo, hi = float(values.min()), float(values.max())
  else:
    lo, hi = (float(v) for v in np.percentile(values, clip_percentiles))
  if not hi > lo:
    raise DataError(f"{path}: has no intensity range between percentiles {clip_percentiles} "
                    f"(all voxels ~{lo:g}); is the image empty?")
  return lo, hi


def load_volume(path: str, shape: Sequence[int], spacing: float,
                clip_percentiles: Sequence[float] | None = (0.5, 99.5), *,
                assume_mni: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """A NIfTI file on the run's grid: float32 `shape` in [0, 1] and the grid's affine.

  The grid is `mni_affine(shape, spacing)`. The source is interpolated once onto it by its own
  affine; grid voxels outside its field of view are background (0). Intensities are scaled by
  robust percentiles of the grid voxels inside the field of view: the same region of MNI space for
  every subject, whatever each file's field of view holds besides (neck, padding), and the
  interpolation is linear, so scaling after it equals scaling the source.
  Images plainly not in MNI space raise DataError unless `assume_mni`.
  """
  path = os.fspath(path)
  shape = tuple(int(n) for n in shape)
  grid = mni_affine(shape, float(spacing))
  img = read_image(path)
  affine = np.asarray(img.affine, np.float64)
  problem = shape_problem(img.shape) or affine_problem(affine)
  if problem:
    raise DataError(f"{path}: {problem}")
  if not assume_mni:
    problem = mni_problem(img.header, img.shape, affine, shape, grid)
    if problem:
      raise DataError(f"{path}: {not_mni_message(problem)}")
  data = _read(path, img)
  if not assume_mni:
    problem = foreground_problem(data, affine)
    if problem:
      raise DataError(f"{path}: {not_mni_message(problem)}")
  out = resample_to_grid(data, affine, shape, grid)
  outside = np.isnan(out)
  if outside.all():
    raise DataError(f"{path}: its field of view does not overlap the run's grid at all")
  lo, hi = intensity_range(out, clip_percentiles, path)
  # In place: each 160x224x160 temporary would cost as much as the percentiles.
  out -= lo
  out *= 1.0 / (hi - lo)
  np.clip(out, 0.0, 1.0, out=out)
  out[outside] = 0.0
  return np.ascontiguousarray(out), grid


def save_volume(path: str, volume: np.ndarray, affine: np.ndarray, *,
                dtype: str = "float32", mni: bool = False) -> str:
  """Write `volume` as NIfTI atomically (`files.atomic_path`).

  qform and sform both hold `affine` (code MNI152 when `mni`, else scanner); units are mm.
  `dtype="int16"` stores scaled integers (half the size; nibabel sets scl_slope/inter), or pass
  "uint8" for label maps. Gzip output is byte-reproducible (nibabel writes mtime 0).
  """
  path = os.fspath(path)
  volume = np.asarray(volume)
  img = nib.Nifti1Image(volume, np.asarray(affine, dtype=np.float64))
  img.set_data_dtype(np.dtype(dtype))
  code = XFORM_MNI if mni else XFORM_SCANNER
  img.set_qform(affine, code=code)
  img.set_sform(affine, code=code)
  img.header.set_xyzt_units("mm")
  with files.atomic_path(path) as tmp:
    nib.save(img, tmp)
  return path
