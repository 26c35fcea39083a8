"""Data pre-flight: every problem of a cohort at once, from the table and the image headers.

Before any training step (and as its own job, `configs/check_data.py`) the participants table is
parsed (`manifest.read_cohort`: missing covariates, non-numeric values, unknown sex codes, duplicate
subjects, missing images) and every image's header is read, never its voxels:

- unreadable or foreign files, and files shorter than their header says (.nii: the file's size;
  .nii.gz: the gzip trailer's uncompressed size, the last 4 bytes, and where that disagrees the
  decompressed stream);
- anything but one 3D volume (4D series, 2D slices);
- zero, absurd or singular voxel sizes;
- images off the MNI grid (`nifti.mni_problem`: no or Talairach xform, or a field of view that
  misses the run's grid), unless `data.assume_mni`.

All of them go into one DataError (subject, file, what is wrong, what to do), or, with
`data.skip_bad_subjects`, those subjects are left out with a warning that lists them. Problems only
the voxels show (NaN, constant images, a foreground far from the MNI brain) stop the loader with
the file's name when it meets them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import os
import struct
import time
import zlib
from collections.abc import Sequence

import numpy as np
from absl import logging

from brain_ldm_jax.data import manifest
from brain_ldm_jax.data import nifti
from brain_ldm_jax.errors import DataError

# Headers are small reads; threads overlap their latency on network file systems.
READ_THREADS = 16


def _gzip_trailer_size(path: str) -> int:
  """The uncompressed size mod 2**32 that a gzip file's last 4 bytes (ISIZE) state."""
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    if f.tell() < 18:  # shorter than a gzip header and trailer
      return -1
    f.seek(-4, os.SEEK_END)
    return struct.unpack("<I", f.read(4))[0]


def _gzip_contents_size(path: str) -> int | None:
  """Bytes that decompress from the whole file, or None where the stream breaks off."""
  size = 0
  try:
    with gzip.open(path, "rb") as f:
      while chunk := f.read(1 << 24):
        size += len(chunk)
  except (EOFError, OSError, zlib.error):
    return None
  return size


def truncation_problem(path: str, img) -> str | None:
  """Why the file holds fewer bytes than its header says (cut off, or a corrupt gzip), or None.

  A .nii.gz is judged by its gzip trailer, which single-stream writers (nibabel, dcm2niix, FSL)
  end with the uncompressed size; only when that disagrees is the file decompressed to be sure
  (a multi-stream gzip's trailer gives its last stream only).
  """
  # The proxy's offset is where nibabel reads the voxels (old files store vox_offset 0).
  needed = int(img.dataobj.offset) + int(np.prod(img.shape)) * img.get_data_dtype().itemsize
  if path.endswith(".gz"):
    if _gzip_trailer_size(path) == needed % 2**32:
      return None
    stored = _gzip_contents_size(path)
    if stored is None:
      return ("is truncated or corrupt: its gzip stream breaks off; re-export or re-download the "
              "file")
  else:
    stored = os.path.getsize(path)
  if stored < needed:
    return (f"is truncated: {stored} bytes of contents, its header needs {needed}; re-export or "
            "re-download the file")
  return None


def image_problems(path: str, grid_shape: Sequence[int], grid_affine: np.ndarray,
                   assume_mni: bool) -> list[str]:
  """Everything wrong with one image that its header shows (each message names the file)."""
  try:
    img = nifti.read_image(path)
  except DataError as e:
    return [str(e)]
  found = [nifti.shape_problem(img.shape)]
  affine = np.asarray(img.affine, np.float64)
  found.append(nifti.affine_problem(affine))
  try:
    found.append(truncation_problem(path, img))
  except OSError as e:
    found.append(f"cannot be read ({e})")
  if not assume_mni and found[0] is None and found[1] is None:
    mni = nifti.mni_problem(img.header, img.shape, affine, grid_shape, grid_affine)
    if mni:
      found.append(nifti.not_mni_message(mni))
  return [f"{path}: {p}" for p in found if p]


def check_cohort(data_config) -> manifest.Cohort:
  """The configured cohort with every problem of its table and its image headers."""
  cohort = manifest.read_cohort(data_config)
  shape = tuple(int(n) for n in data_config.shape)
  grid = nifti.mni_affine(shape, float(data_config.spacing))
  assume_mni = bool(data_config.get("assume_mni", False))
  with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
    found = list(pool.map(lambda s: image_problems(s.image_path, shape, grid, assume_mni),
                          cohort.subjects))
  image = [manifest.Problem(s.participant_id, f"subject {s.participant_id}: {message}")
           for s, messages in zip(cohort.subjects, found) for message in messages]
  return dataclasses.replace(cohort, problems=cohort.problems + image)


def checked_subjects(data_config) -> list[manifest.Subject]:
  """The cohort's subjects once the pre-flight passes: DataError listing every problem, or (with
  `data.skip_bad_subjects`) the good subjects and a warning listing the rest."""
  start = time.monotonic()
  cohort = check_cohort(data_config)
  logging.info("pre-flight: %d subjects of %s checked in %.1f s", cohort.num_subjects, cohort.tsv,
               time.monotonic() - start)
  if not cohort.problems:
    return cohort.subjects
  if not data_config.skip_bad_subjects:
    raise DataError(cohort.report())
  good = cohort.good_subjects()
  if not good:
    raise DataError(f"no subject is left once the bad ones are skipped:\n{cohort.report()}")
  logging.warning("data.skip_bad_subjects: leaving out %d subjects\n%s",
                  len(cohort.bad_subjects()), cohort.report())
  return good
