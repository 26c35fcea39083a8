"""NIfTI I/O and the preprocessing every volume goes through (nibabel + scipy).

`load_volume` turns any 3D NIfTI into the model's input: RAS+ axes, isotropic `spacing` mm, a
central crop/pad to `shape`, intensities robustly scaled to [0, 1]. The affine it returns belongs to
the returned array, so `save_volume(path, *load_volume(...))` overlays the input in any viewer.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations
from scipy import ndimage

from brain_ldm_jax.errors import DataError

# Centre (mm) of the MNI152 brain's bounding box (nilearn's 2009a brain mask), so a grid centred
# here holds the whole brain (mask bounding box x -72..72, y -107..73, z -72..82 mm).
MNI_BRAIN_CENTRE = (0.0, -17.0, 5.0)

# NIfTI xform codes: 1 = scanner-anatomical, 4 = MNI152.
XFORM_SCANNER = 1
XFORM_MNI = 4


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
  """Voxel edge lengths (mm) along the array axes of `affine` (works for oblique affines)."""
  return np.sqrt(np.sum(np.asarray(affine)[:3, :3] ** 2, axis=0))


def mni_affine(shape: Sequence[int], spacing: float) -> np.ndarray:
  """RAS+ affine of a `shape` grid at `spacing` mm centred on the MNI152 brain box.

  The translation is rounded to whole mm so that at 1 mm the grid shares voxel centres with the
  1 mm MNI template (cropping it needs no interpolation).
  """
  shape = np.asarray(shape, dtype=np.float64)
  origin = np.round(np.asarray(MNI_BRAIN_CENTRE) - spacing * (shape - 1) / 2)
  affine = np.diag([spacing, spacing, spacing, 1.0])
  affine[:3, 3] = origin
  return affine


def _read(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Raw float32 data and affine of a NIfTI file; DataError naming the file for anything bad."""
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
  try:
    data = np.asarray(img.dataobj, dtype=np.float32)
  except (EOFError, OSError, ValueError, zlib.error) as e:
    raise DataError(f"{path}: truncated or corrupt image data ({type(e).__name__}: {e}); "
                    "re-export or re-download the file") from e
  return data, np.asarray(img.affine, dtype=np.float64)


def _as_3d(data: np.ndarray, path: str) -> np.ndarray:
  """Drop singleton dimensions after the third (a 3D image saved as X×Y×Z×1); refuse real 4D."""
  if data.ndim < 3:
    raise DataError(f"{path}: has {data.ndim} dimensions {data.shape}; a 3D volume is needed")
  extra = data.shape[3:]
  if any(n != 1 for n in extra):
    raise DataError(f"{path}: is {data.ndim}D with shape {data.shape}; a single 3D volume is "
                    "needed (split the series, e.g. nibabel.funcs.four_to_three)")
  return data.reshape(data.shape[:3])


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Flip/permute axes to the closest RAS+ orientation (as nibabel's as_closest_canonical)."""
  ornt = orientations.io_orientation(affine)
  if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
    return data, affine
  affine = affine @ orientations.inv_ornt_aff(ornt, data.shape)
  data = orientations.apply_orientation(data, ornt)
  return np.ascontiguousarray(data), affine


def resample(data: np.ndarray, affine: np.ndarray,
             spacing: float) -> tuple[np.ndarray, np.ndarray]:
  """Linear resampling to `spacing` mm voxels over the same field of view (axes kept).

  The new grid is centred on the old one; when shrinking, a Gaussian prefilter
  (sigma = (factor - 1) / 2 voxels, as scikit-image) prevents aliasing.
  """
  zooms = voxel_sizes(affine)
  if np.allclose(zooms, spacing, rtol=1e-3, atol=0):
    return data, affine
  step = spacing / zooms  # input voxels per output voxel
  in_shape = np.asarray(data.shape)
  out_shape = np.maximum(1, np.round(in_shape / step)).astype(int)
  offset = (in_shape - 1) / 2 - step * (out_shape - 1) / 2
  sigma = np.maximum(0.0, (step - 1) / 2)
  if np.any(sigma > 0):
    data = ndimage.gaussian_filter(data, sigma, mode="nearest")
  out = ndimage.affine_transform(data, step, offset=offset, output_shape=tuple(out_shape),
                                 order=1, mode="nearest")
  scale = np.eye(4)
  scale[:3, :3] = np.diag(step)
  scale[:3, 3] = offset
  return out.astype(np.float32, copy=False), affine @ scale


def crop_or_pad(data: np.ndarray, affine: np.ndarray, shape: Sequence[int],
                fill: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """Central crop / pad to `shape`; the affine's translation follows the first kept voxel."""
  start = [(n - t) // 2 if n >= t else -((t - n) // 2) for n, t in zip(data.shape, shape)]
  out = np.full(tuple(shape), fill, dtype=data.dtype)
  src = tuple(slice(max(s, 0), max(s, 0) + min(n - max(s, 0), t - max(-s, 0)))
              for s, n, t in zip(start, data.shape, shape))
  dst = tuple(slice(max(-s, 0), max(-s, 0) + (sl.stop - sl.start)) for s, sl in zip(start, src))
  out[dst] = data[src]
  shift = np.eye(4)
  shift[:3, 3] = start
  return out, affine @ shift


def scale_intensity(data: np.ndarray, clip_percentiles: Sequence[float] | None,
                    path: str = "volume") -> np.ndarray:
  """Clip at the given percentiles (None: min/max) and map linearly to [0, 1]."""
  if clip_percentiles is None:
    lo, hi = float(data.min()), float(data.max())
  else:
    lo, hi = (float(v) for v in np.percentile(data, clip_percentiles))
  if not hi > lo:
    raise DataError(f"{path}: has no intensity range between percentiles {clip_percentiles} "
                    f"(all voxels ~{lo:g}); is the image empty?")
  return np.clip((data - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def load_volume(path: str, shape: Sequence[int], spacing: float,
                clip_percentiles: Sequence[float] | None = (0.5, 99.5),
                ) -> tuple[np.ndarray, np.ndarray]:
  """A NIfTI file as the model sees it: float32 (X, Y, Z) in [0, 1] and its RAS+ affine.

  Steps: reorient to RAS+, resample to isotropic `spacing` mm (linear), scale intensities by
  robust percentiles over the resampled field of view, then crop/pad centrally (pad value 0).
  """
  path = os.fspath(path)
  data, affine = _read(path)
  data = _as_3d(data, path)
  if not np.all(np.isfinite(data)):
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    raise DataError(f"{path}: has {bad} NaN/Inf voxels; fix or mask them before training")
  data, affine = to_ras(data, affine)
  data, affine = resample(data, affine, float(spacing))
  data = scale_intensity(data, clip_percentiles, path)
  return crop_or_pad(data, affine, tuple(int(n) for n in shape))


def save_volume(path: str, volume: np.ndarray, affine: np.ndarray, *,
                dtype: str = "float32", mni: bool = False) -> str:
  """Write `volume` as NIfTI atomically (temp file in the same folder, then os.replace).

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
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  suffix = ".nii.gz" if path.endswith(".gz") else ".nii"
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
  os.close(fd)
  try:
    nib.save(img, tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path
