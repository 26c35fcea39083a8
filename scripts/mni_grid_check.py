r"""Real MNI-space T1s loaded onto a run's grid against the source sampled at the grid's world
coordinates by nilearn (linear): the correlation should be ~1.

    python scripts/mni_grid_check.py [FILE ...] [--shape=160,224,160 --spacing=1]

Without files: Colin27 from Debian's mricron-data (/usr/share/mricron/templates/ch2.nii.gz,
ch2better.nii.gz) and nilearn's MNI152 2009a T1. nilearn does not low-pass a finer source, so a
0.5 mm file reads slightly below 1.
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags
import nibabel as nib
import nilearn
from nilearn import image
import numpy as np

from brain_ldm_jax.data import nifti

_SHAPE = flags.DEFINE_list("shape", ["160", "224", "160"], "Grid shape (the paper's).")
_SPACING = flags.DEFINE_float("spacing", 1.0, "Grid spacing in mm.")

DEFAULT_FILES = (
    "/usr/share/mricron/templates/ch2.nii.gz",
    "/usr/share/mricron/templates/ch2better.nii.gz",
    os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data",
                 "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
)


def correlation(path: str, shape, spacing: float) -> tuple[float, float]:
  """(r against nilearn's sampling at the grid, seconds of load_volume)."""
  start = time.perf_counter()
  volume, affine = nifti.load_volume(path, shape, spacing)
  seconds = time.perf_counter() - start
  reference = image.resample_img(nib.load(path), target_affine=affine, target_shape=shape,
                                 interpolation="linear", fill_value=0, force_resample=True,
                                 copy_header=True).get_fdata()
  return float(np.corrcoef(volume.ravel(), reference.ravel())[0, 1]), seconds


def main(argv):
  shape = tuple(int(n) for n in _SHAPE.value)
  for path in argv[1:] or DEFAULT_FILES:
    r, seconds = correlation(path, shape, _SPACING.value)
    print(f"{os.path.basename(path)} {nib.load(path).shape} -> {'x'.join(map(str, shape))} at "
          f"{_SPACING.value:g} mm: r = {r:.4f} ({seconds:.2f} s)")


if __name__ == "__main__":
  app.run(main)
