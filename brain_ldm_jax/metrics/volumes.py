"""Conditioning fidelity: ventricular and brain volume (mL) of brains in MNI space.

Pinaya et al. measured the ventricles of their samples with SynthSeg and correlated them with the
requested values (r = 0.972). SynthSeg is a PyTorch/TensorFlow network; here the measurement is an
atlas-guided intensity model, vectorised in JAX and jitted over batches, that works on any MNI grid
(1, 2, 4 mm ...) given the grid's affine:

1. Template priors (nilearn's MNI152 2009a and the synthetic cohort's label map of it,
   `data.synthetic.load_template`) are resampled once per grid: the lateral ventricles dilated by
   `VENTRICLE_MARGIN_MM` (where ventricular CSF is counted: it must hold ventricles several times the
   template's), a WM core and a GM core (coverage > 0.99 / 0.95) and the brain mask dilated by
   `BRAIN_MARGIN_MM`.
2. Intensity normalisation per brain: a smooth local white-matter level (normalised Gaussian
   convolution of the image over the WM core, sigma `BIAS_SIGMA_MM`) divides out bias fields; a
   per-image gamma from the GM/WM ratio (its template value is known) undoes contrast changes, so
   intensities come back on the template's scale (`t = t_wm (I / wm_local) ** (1 / gamma)`).
3. Soft (partial-volume) counts: ventricles = sum over the ventricle region of a linear ramp that is
   1 below `VENTRICLE_LEVEL - width/2` and 0 above `+ width/2`; tissue (GM + WM) = sum over the
   brain region of a ramp between CSF and GM levels; intracranial volume (ICV) = every voxel above
   background. Ramps rather than hard thresholds keep the counts smooth at coarse grids.
4. Brain volume is the tissue volume. Cohorts whose covariate is normalised for head size (UK
   Biobank's, which the paper used) calibrate against `normalised_brain_volume` = tissue x
   ICV_template / ICV instead: a skull-stripped image shows head size only through its ICV.
5. A linear calibration per quantity (`Calibration`, fitted on a calibration split with ground
   truth, stored as JSON with the data's provenance) maps raw measurements to the cohort's units
   (e.g. native-space SynthSeg or SIENAX-scaled mL in UK Biobank, warped label maps here).

Accuracy on the synthetic cohort (held-out subjects, tests/test_volumes.py): r >= 0.98 for the
ventricles and the brain (GM + WM) volume against the warped label maps.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from brain_ldm_jax import files
from brain_ldm_jax.data import synthetic
from brain_ldm_jax.errors import DataError

VENTRICLE_MARGIN_MM = 7.0
BRAIN_MARGIN_MM = 8.0
BIAS_SIGMA_MM = 10.0
WM_CORE_COVERAGE = 0.99
GM_CORE_COVERAGE = 0.95
# Levels on the template's intensity scale (WM ~ 0.84, GM ~ 0.66, ventricular CSF ~ 0.3 - 0.4).
VENTRICLE_LEVEL, VENTRICLE_WIDTH = 0.55, 0.1
TISSUE_LOW, TISSUE_HIGH = 0.3, 0.5
BACKGROUND_LOW, BACKGROUND_HIGH = 0.05, 0.15
GAMMA_RANGE = (0.3, 3.0)

QUANTITIES = ("ventricular_volume", "brain_volume")
RAW_FEATURES = ("ventricular_volume", "brain_volume", "intracranial_volume",
                "normalised_brain_volume")


# ----------------------------------------------------------------------------- atlas on a grid


@dataclasses.dataclass(frozen=True)
class Atlas:
  """Template priors on one image grid (host arrays) and the template's reference levels."""
  shape: tuple[int, int, int]
  spacing: tuple[float, float, float]
  ventricle_region: np.ndarray  # float32 {0, 1}
  brain_region: np.ndarray  # float32 {0, 1}
  wm_core: np.ndarray  # float32 {0, 1}
  gm_core: np.ndarray  # float32 {0, 1}
  wm_level: float  # template WM median
  gm_level: float  # template GM median
  icv_template_ml: float  # template brain mask (GM + WM + CSF) volume

  @property
  def voxel_ml(self) -> float:
    return float(np.prod(self.spacing)) / 1000.0


def _template():
  return synthetic, synthetic.load_template(1.0)


def _resample_fraction(mask_1mm: np.ndarray, world_to_voxel: np.ndarray, shape, affine):
  """Fraction of each target voxel covered by a 1 mm mask (box average, then linear sampling)."""
  from scipy import ndimage  # pylint: disable=import-outside-toplevel
  spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
  size = np.maximum(1, np.round(spacing)).astype(int)
  m = mask_1mm.astype(np.float32)
  if np.any(size > 1):
    m = ndimage.uniform_filter(m, size=tuple(size))
  ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
  xyz = affine[:3, :3] @ ijk + affine[:3, 3:]
  coords = world_to_voxel[:3, :3] @ xyz + world_to_voxel[:3, 3:]
  return ndimage.map_coordinates(m, coords, order=1, mode="constant").reshape(shape)


def _within(mask: np.ndarray, spacing, margin_mm: float) -> np.ndarray:
  from scipy import ndimage  # pylint: disable=import-outside-toplevel
  return ndimage.distance_transform_edt(~mask, sampling=spacing) <= margin_mm


@functools.lru_cache(maxsize=8)
def _atlas_cached(shape: tuple[int, int, int], affine_bytes: bytes) -> Atlas:
  affine = np.frombuffer(affine_bytes, np.float64).reshape(4, 4)
  synthetic, t = _template()
  frac = lambda label_mask: _resample_fraction(label_mask, t.world_to_voxel, shape, affine)
  spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(0)))
  labels = t.labels
  vent = frac(labels == synthetic.LABEL_VENTRICLE) >= 0.5
  brain = frac(labels > 0) >= 0.5
  wm_core = frac(labels == synthetic.LABEL_WM) > WM_CORE_COVERAGE
  gm_core = frac(labels == synthetic.LABEL_GM) > GM_CORE_COVERAGE
  if not vent.any() or not wm_core.any() or not gm_core.any():
    raise DataError(f"the grid {shape} with affine {affine.tolist()} does not hold the MNI brain "
                    "(no ventricles / WM / GM of the template inside): volumes need MNI space")
  f32 = lambda m: m.astype(np.float32)
  return Atlas(shape=shape, spacing=spacing,
               ventricle_region=f32(_within(vent, spacing, VENTRICLE_MARGIN_MM)),
               brain_region=f32(_within(brain, spacing, BRAIN_MARGIN_MM)),
               wm_core=f32(wm_core), gm_core=f32(gm_core),
               wm_level=float(np.median(t.t1[labels == synthetic.LABEL_WM])),
               gm_level=float(np.median(t.t1[labels == synthetic.LABEL_GM])),
               icv_template_ml=synthetic.template_icv_ml())


def atlas_for_grid(shape: Sequence[int], affine) -> Atlas:
  """Template priors on the grid `shape` with voxel -> MNI mm `affine` (cached per grid)."""
  affine = np.ascontiguousarray(np.asarray(affine, np.float64))
  return _atlas_cached(tuple(int(n) for n in shape), affine.tobytes())


# ----------------------------------------------------------------------------- measurement


def _gaussian_taps(sigma_vox: float) -> np.ndarray:
  radius = max(1, int(np.ceil(3 * sigma_vox)))
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  taps = np.exp(-0.5 * (x / sigma_vox) ** 2)
  return (taps / taps.sum()).astype(np.float32)


def _blur(x: jax.Array, taps_per_axis: Sequence[np.ndarray]) -> jax.Array:
  """Separable zero-padded 'same' Gaussian over the 3 spatial axes of (B, X, Y, Z)."""
  for axis, taps in zip((1, 2, 3), taps_per_axis):
    r = len(taps) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = jnp.pad(x, pad)
    n = x.shape[axis]
    # Shifted slices fuse into one loop on CPU (see metrics.ssim.filter_valid).
    x = sum(float(w) * jax.lax.slice_in_dim(xp, k, k + n, axis=axis) for k, w in enumerate(taps))
  return x


def _masked_median(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Median of each volume's voxels where mask (shared) is set; (B,)."""
  return jnp.nanmedian(jnp.where(mask[None] > 0, x, jnp.nan).reshape(x.shape[0], -1), axis=1)


@functools.partial(jax.jit, static_argnames=("wm_level", "gm_level", "voxel_ml", "taps"))
def _raw(volumes, vent_region, brain_region, wm_core, gm_core, wm_level, gm_level, voxel_ml,
         taps):
  """(B, 3): ventricle, tissue and intracranial mL before calibration."""
  taps = [np.asarray(t, np.float32) for t in taps]
  x = jnp.asarray(volumes, jnp.float32)
  # Local WM level by normalised convolution over the WM core: divides out smooth bias fields.
  num = _blur(x * wm_core[None], taps)
  den = _blur(wm_core[None], taps)
  wm_local = jnp.maximum(num / jnp.maximum(den, 1e-3), 1e-3)
  ratio = jnp.clip(x / wm_local, 0.0, None)
  # Per-image gamma from the GM/WM ratio, whose template value is known.
  gm_ratio = jnp.clip(_masked_median(ratio, gm_core), 1e-3, 0.999)
  gamma = jnp.clip(jnp.log(gm_ratio) / np.log(gm_level / wm_level), *GAMMA_RANGE)
  t = wm_level * ratio ** (1.0 / gamma[:, None, None, None])
  lo = VENTRICLE_LEVEL - VENTRICLE_WIDTH / 2
  vent = jnp.clip((lo + VENTRICLE_WIDTH - t) / VENTRICLE_WIDTH, 0.0, 1.0) * vent_region[None]
  tissue = jnp.clip((t - TISSUE_LOW) / (TISSUE_HIGH - TISSUE_LOW), 0, 1) * brain_region[None]
  icv = (jnp.clip((t - BACKGROUND_LOW) / (BACKGROUND_HIGH - BACKGROUND_LOW), 0, 1)
         * brain_region[None])
  total = lambda m: m.reshape(m.shape[0], -1).sum(1) * voxel_ml
  return jnp.stack([total(vent), total(tissue), total(icv)], axis=1)


def raw_measurements(volumes, affine, batch_size: int = 8) -> dict[str, np.ndarray]:
  """Uncalibrated volumes (mL) of brains (N, X, Y, Z) in [0, 1] on the MNI grid of `affine`.

  Returns RAW_FEATURES -> (N,) arrays: ventricles, brain (GM + WM tissue), intracranial volume and
  the head-size-normalised brain volume (tissue x ICV_template / ICV). Batches are fixed-size (the last
  padded), so one compilation serves any N. `volumes` may be a lazy integer-indexable list.
  """
  n = len(volumes)
  if n == 0:
    return {k: np.zeros((0,)) for k in RAW_FEATURES}
  shape = tuple(np.shape(volumes[0]))
  if len(shape) != 3:
    raise DataError(f"volumes must be (N, X, Y, Z); one volume has shape {shape}")
  atlas = atlas_for_grid(shape, affine)
  taps = tuple(tuple(_gaussian_taps(BIAS_SIGMA_MM / s).tolist()) for s in atlas.spacing)
  consts = [jnp.asarray(a) for a in (atlas.ventricle_region, atlas.brain_region, atlas.wm_core,
                                     atlas.gm_core)]
  out = []
  for s in range(0, n, batch_size):
    chunk = np.stack([np.asarray(volumes[i], np.float32) for i in range(s, min(n, s + batch_size))])
    k = len(chunk)
    if k < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - k, axis=0)])
    out.append(np.asarray(_raw(jnp.asarray(chunk), *consts, atlas.wm_level, atlas.gm_level,
                               atlas.voxel_ml, taps))[:k])
  raw = np.concatenate(out).astype(np.float64)
  vent, tissue, icv = raw[:, 0], raw[:, 1], raw[:, 2]
  normalised = tissue * atlas.icv_template_ml / np.maximum(icv, 1e-6)
  return dict(ventricular_volume=vent, brain_volume=tissue, intracranial_volume=icv,
              normalised_brain_volume=normalised)


# ----------------------------------------------------------------------------- calibration


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Per quantity: calibrated = slope * raw + intercept; with where the fit came from."""
  slope: Mapping[str, float]
  intercept: Mapping[str, float]
  provenance: Mapping[str, object]

  def apply(self, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {q: self.slope[q] * np.asarray(raw[q], np.float64) + self.intercept[q]
            for q in self.slope if q in raw}

  def to_json(self) -> dict:
    return dict(slope=dict(self.slope), intercept=dict(self.intercept),
                provenance=dict(self.provenance), method=__name__ + ".raw_measurements",
                constants=dict(ventricle_margin_mm=VENTRICLE_MARGIN_MM,
                               brain_margin_mm=BRAIN_MARGIN_MM, bias_sigma_mm=BIAS_SIGMA_MM,
                               ventricle_level=VENTRICLE_LEVEL, ventricle_width=VENTRICLE_WIDTH,
                               tissue_levels=[TISSUE_LOW, TISSUE_HIGH]))

  @classmethod
  def from_json(cls, d: Mapping) -> "Calibration":
    return cls(slope=dict(d["slope"]), intercept=dict(d["intercept"]),
               provenance=dict(d.get("provenance", {})))

  def save(self, path: str) -> None:
    files.write_text_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")

  @classmethod
  def load(cls, path: str) -> "Calibration":
    if not os.path.isfile(path):
      raise DataError(f"volume calibration {path} not found")
    with open(path) as f:
      return cls.from_json(json.load(f))


def fit_calibration(raw: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray],
                    provenance: Mapping[str, object],
                    quantities: Sequence[str] = QUANTITIES) -> Calibration:
  """Least-squares line truth ~ slope * raw + intercept for each quantity present in `truth`."""
  slope, intercept = {}, {}
  for q in quantities:
    if q not in truth:
      continue
    x, y = np.asarray(raw[q], np.float64), np.asarray(truth[q], np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.std(x[ok]) == 0:
      raise DataError(f"calibrating {q}: need >= 3 subjects with varying values, got {ok.sum()}")
    a, b = np.polyfit(x[ok], y[ok], 1)
    slope[q], intercept[q] = float(a), float(b)
  return Calibration(slope, intercept, dict(provenance, num_subjects=int(len(next(iter(
      truth.values()))))))


def measure(volumes, affine, calibration: Calibration, batch_size: int = 8) -> dict[str, np.ndarray]:
  """Calibrated volumes (mL, the calibration cohort's units) plus the raw features."""
  raw = raw_measurements(volumes, affine, batch_size)
  out = {f"raw_{k}": v for k, v in raw.items()}
  out.update(calibration.apply(raw))
  return out


def fidelity(requested, measured) -> dict[str, float]:
  """Pearson r and mean absolute error of measured vs requested (the paper's check)."""
  x, y = np.asarray(requested, np.float64), np.asarray(measured, np.float64)
  ok = np.isfinite(x) & np.isfinite(y)
  x, y = x[ok], y[ok]
  r = float(np.corrcoef(x, y)[0, 1]) if x.size >= 2 and x.std() > 0 and y.std() > 0 else float("nan")
  mae = float(np.mean(np.abs(x - y))) if x.size else float("nan")
  return dict(r=r, mae=mae, n=int(x.size))


__all__ = ["Atlas", "Calibration", "QUANTITIES", "RAW_FEATURES", "atlas_for_grid", "fidelity",
           "fit_calibration", "measure", "raw_measurements"]
