"""A synthetic cohort from the bundled MNI152 template, so every job runs without private data.

Each subject is the nilearn MNI152 2009a T1 warped by a diffeomorphism (a stationary velocity
field integrated by scaling and squaring, on a coarse 4 mm grid) made of
  * ventricle growth: flow along the gradient of the smoothed lateral-ventricle mask, whose
    strength grows with age (log-linear, with individual variation; up to ~8x the template's
    12.8 mL, the several-fold range of UK Biobank's 7-171 mL);
  * atrophy: flow along the gradient of the smoothed CSF/outside map, widening sulci and
    shrinking the brain surface, stronger with age;
  * a smooth random elastic deformation;
then scaled globally by head size (sex + individual variation), with a random gamma contrast, a
smooth multiplicative bias field and Rician noise (that of a 1 mm scan as the loader resamples
it to the cohort's spacing).

Ground truth comes from the label map warped with the same field: ventricular_volume = ventricle
voxels x voxel volume (mL); brain_volume = GM + WM voxels x voxel volume (mL), the tissue volume the
image shows. (UK Biobank's covariate, which the paper used, is normalised for head size; in this
model head size sets the intracranial volume and tissue alike, so tissue / ICV varies by only ~1 %
across the cohort and would make a covariate no measurement can resolve.) The hidden head_scale is
kept as an extra participants.tsv column. Sex is written as BIDS "M"/"F".
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import logging
from scipy import ndimage
from scipy import special

from brain_ldm_jax import files
from brain_ldm_jax import multihost
from brain_ldm_jax.data import nifti

LABEL_BACKGROUND, LABEL_CSF, LABEL_GM, LABEL_WM, LABEL_VENTRICLE = 0, 1, 2, 3, 4
PARTICIPANT_COLUMNS = ("participant_id", "age", "sex", "ventricular_volume", "brain_volume",
                       "head_scale")
COMPLETE_MARKER = ".cohort_complete.json"

AGE_MEAN, AGE_STD, AGE_RANGE = 63.6, 7.5, (44.0, 82.0)  # UK Biobank as in the paper
MALE_FRACTION = 0.47
FIELD_SPACING_MM = 4.0  # the deformation is built on this grid and interpolated to the image's
SQUARINGS = 5


@dataclasses.dataclass(frozen=True)
class Template:
  """Template arrays on the 1 mm MNI grid, prefiltered for the target spacing."""
  t1: np.ndarray  # float32, [0, 1]
  labels: np.ndarray  # uint8, LABEL_*
  world_to_voxel: np.ndarray  # 4x4
  vent_potential: np.ndarray  # float32, smoothed lateral-ventricle mask
  csf_potential: np.ndarray  # float32, smoothed CSF + outside-brain map


def _find_lateral_ventricles(t1: np.ndarray, brain: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """The two largest dark components inside a central MNI box.

  The threshold (the box's darkest 10% of brain voxels) gives two 6.6 mL components, as the
  6.4 mL each that a manual probe of the template found; looser thresholds leak into the sulci.
  """
  # The template's affine is axis-aligned, so the box is a product of 1D ranges.
  x, y, z = (affine[a, a] * np.arange(n) + affine[a, 3] for a, n in enumerate(t1.shape))
  box = ((np.abs(x) < 30)[:, None, None] & ((y > -45) & (y < 30))[None, :, None]
         & ((z > -8) & (z < 35))[None, None, :])
  dark = brain & box & (t1 < np.percentile(t1[brain & box], 10))
  components, n = ndimage.label(dark)
  sizes = np.bincount(components.ravel(), minlength=n + 1)
  sizes[0] = 0
  keep = np.argsort(sizes)[-2:]
  return np.isin(components, keep[sizes[keep] > 0])


@functools.lru_cache(maxsize=2)
def load_template(spacing: float) -> Template:
  """nilearn's bundled MNI152 2009a T1, tissue maps and our label map (cached per spacing)."""
  from nilearn import datasets  # pylint: disable=g-import-not-at-top  (slow import)
  t1_img = datasets.load_mni152_template(resolution=1)
  t1 = np.asarray(t1_img.get_fdata(), np.float32)
  gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), np.float32)
  wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), np.float32)
  brain = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj) > 0
  affine = np.asarray(t1_img.affine, np.float64)
  t1 = t1 / t1.max()
  vent = _find_lateral_ventricles(t1, brain, affine)
  tissue = gm + wm >= 0.5
  labels = np.where(brain, LABEL_CSF, LABEL_BACKGROUND).astype(np.uint8)
  labels[brain & tissue] = np.where(gm >= wm, LABEL_GM, LABEL_WM)[brain & tissue]
  labels[vent] = LABEL_VENTRICLE
  # Anti-aliasing for coarser targets, as the loader filters; labels are sampled nearest.
  sigma = float(nifti.antialias_sigma(spacing))
  if sigma > 0:
    t1 = ndimage.gaussian_filter(t1, sigma)
  vent_potential = ndimage.gaussian_filter(vent.astype(np.float32), 3.0)
  csf_potential = ndimage.gaussian_filter(np.clip(1.0 - gm - wm, 0, 1) * ~vent, 2.0)
  return Template(t1=t1, labels=labels, world_to_voxel=np.linalg.inv(affine),
                  vent_potential=vent_potential, csf_potential=csf_potential)


@dataclasses.dataclass(frozen=True)
class Grid:
  """The target image grid and the coarse grid the deformation lives on."""
  shape: tuple[int, int, int]
  spacing: float
  affine: np.ndarray
  factor: int  # target voxels per coarse voxel
  coarse_shape: tuple[int, int, int]

  @property
  def coarse_spacing(self) -> float:
    return self.spacing * self.factor

  def coarse_world(self) -> np.ndarray:
    """World (mm) coordinates of coarse grid points, (3, cx, cy, cz)."""
    ijk = np.indices(self.coarse_shape, dtype=np.float64) * self.factor
    return (np.einsum("ij,j...->i...", self.affine[:3, :3], ijk)
            + self.affine[:3, 3, None, None, None])


def make_grid(shape: Sequence[int], spacing: float) -> Grid:
  shape = tuple(int(n) for n in shape)
  factor = max(1, int(round(FIELD_SPACING_MM / spacing)))
  coarse = tuple((n - 1) // factor + 2 for n in shape)
  return Grid(shape, float(spacing), nifti.mni_affine(shape, spacing), factor, coarse)


@functools.lru_cache(maxsize=2)
def _potential_gradients(spacing: float, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """Gradients (1/mm) of the ventricle and CSF potentials at the coarse grid points."""
  template, grid = load_template(spacing), make_grid(shape, spacing)
  coords = _world_to_template(grid.coarse_world(), template)
  grads = []
  for potential in (template.vent_potential, template.csf_potential):
    sampled = ndimage.map_coordinates(potential, coords, order=1, mode="nearest")
    grads.append(np.stack(np.gradient(sampled, grid.coarse_spacing)).astype(np.float32))
  return grads[0], grads[1]


def _world_to_template(xyz: np.ndarray, template: Template) -> np.ndarray:
  m = template.world_to_voxel
  return np.einsum("ij,j...->i...", m[:3, :3], xyz) + m[:3, 3, None, None, None]


def _exponentiate(velocity: np.ndarray, spacing: float) -> np.ndarray:
  """Displacement (mm) of the flow of a stationary velocity field (mm) by scaling and squaring."""
  disp = velocity / 2.0**SQUARINGS
  grid = np.indices(velocity.shape[1:], dtype=np.float32)
  for _ in range(SQUARINGS):
    at = grid + disp / spacing
    disp = disp + np.stack([ndimage.map_coordinates(c, at, order=1, mode="nearest")
                            for c in disp])
  return disp


def _upsample_linear(coarse: np.ndarray, factor: int, shape: Sequence[int]) -> np.ndarray:
  """Separable linear interpolation of coarse points k*factor to every voxel of `shape`.

  Per axis, voxel k*factor + r is c[k] + (c[k+1] - c[k]) * r/factor: one broadcast op of the
  output's size (the last axis, done last, is the only full-size pass).
  """
  weights = np.arange(factor, dtype=np.float32) / factor
  out = coarse.astype(np.float32, copy=False)
  for axis, n in zip(range(-3, 0), shape):
    out = np.moveaxis(out, axis, -1)
    base = out[..., :-1, None]
    interp = base + (out[..., 1:, None] - base) * weights
    out = np.moveaxis(interp.reshape(*interp.shape[:-2], -1)[..., :n], -1, axis)
  return np.ascontiguousarray(out)


def _smooth_noise(rng: np.random.Generator, grid: Grid, control_mm: float) -> np.ndarray:
  """A smooth unit-variance-ish random field on the coarse grid (control points every ~mm)."""
  ctrl = tuple(max(2, int(np.ceil(n * grid.coarse_spacing / control_mm)) + 1)
               for n in grid.coarse_shape)
  field = rng.standard_normal(ctrl).astype(np.float32)
  zoom = [c / k for c, k in zip(grid.coarse_shape, ctrl)]
  return ndimage.zoom(field, zoom, order=1, mode="nearest", grid_mode=False)[
      tuple(slice(0, n) for n in grid.coarse_shape)]


@dataclasses.dataclass(frozen=True)
class SubjectParams:
  age: float
  sex: int  # 1 male, 0 female
  head_scale: float
  ventricle_strength: float
  atrophy_strength: float


# Flow strengths (mm^2 per unit potential gradient) were calibrated so that log(ventricle volume)
# grows ~8x from age 44 to 82 (6 -> 50 mL at the median; 3-80 mL overall) and the brain
# loses ~13% (UK Biobank-like trends; measured on the 4 mm grid).
VENTRICLE_GAIN = 120.0
ATROPHY_GAIN = 14.0


def draw_params(rng: np.random.Generator) -> SubjectParams:
  """Covariates and the hidden ageing/size factors of one subject."""
  age = float(np.clip(rng.normal(AGE_MEAN, AGE_STD), *AGE_RANGE))
  sex = int(rng.random() < MALE_FRACTION)
  head_scale = float((1.018 if sex else 0.983) * np.exp(rng.normal(0.0, 0.025)))
  decades = (age - AGE_MEAN) / 10.0
  ventricle = float(0.35 + 0.35 * decades + 0.3 * rng.normal())
  atrophy = float(max(0.0, 1.0 + 0.45 * decades + 0.2 * rng.normal()))
  return SubjectParams(age, sex, head_scale, ventricle, atrophy)


def synthesize(params: SubjectParams, rng: np.random.Generator, shape: Sequence[int],
               spacing: float) -> tuple[np.ndarray, np.ndarray]:
  """One subject: (int16 T1 image, uint8 label map) on the MNI grid of `shape` at `spacing`."""
  template = load_template(float(spacing))
  grid = make_grid(shape, spacing)
  vent_grad, csf_grad = _potential_gradients(float(spacing), grid.shape)
  elastic = np.stack([_smooth_noise(rng, grid, 40.0) for _ in range(3)]) * 1.5
  velocity = (VENTRICLE_GAIN * params.ventricle_strength * vent_grad
              + ATROPHY_GAIN * params.atrophy_strength * csf_grad + elastic)
  disp = _exponentiate(velocity, grid.coarse_spacing)
  # Subject point x -> template point: deform, then undo the head scale about the brain centre.
  centre = np.asarray(nifti.MNI_BRAIN_CENTRE)[:, None, None, None]
  world = grid.coarse_world() + disp
  world = centre + (world - centre) / params.head_scale
  coarse = np.concatenate([_world_to_template(world, template).astype(np.float32),
                           0.12 * _smooth_noise(rng, grid, 60.0)[None]])
  full = _upsample_linear(coarse, grid.factor, grid.shape)
  coords, log_bias = full[:3], full[3]
  labels = ndimage.map_coordinates(template.labels, coords, order=0, mode="constant", cval=0)
  t1 = ndimage.map_coordinates(template.t1, coords, order=1, mode="constant", cval=0.0)
  gamma = float(np.exp(rng.normal(0.0, 0.12)))
  t1 = np.power(np.clip(t1, 0, None), gamma) * np.exp(log_bias)
  t1 = _scanner_noise(t1, float(rng.uniform(0.01, 0.03)), rng, spacing)
  image = np.clip(np.round(t1 * 1000.0), 0, np.iinfo(np.int16).max).astype(np.int16)
  return image, labels.astype(np.uint8)


def _rician_mean(signal: np.ndarray, noise_std: float) -> np.ndarray:
  """E|signal + noise_std * z| for z ~ N(0, 1): the mean magnitude of a noisy MR voxel."""
  ratio = signal / noise_std
  return (noise_std * np.sqrt(2.0 / np.pi) * np.exp(-0.5 * ratio**2)
          + signal * special.erf(ratio / np.sqrt(2.0))).astype(np.float32)


def _scanner_noise(t1: np.ndarray, noise_std_1mm: float, rng: np.random.Generator,
                   spacing: float) -> np.ndarray:
  """`t1` (non-negative) with the Rician noise of a 1 mm scan as the loader makes it at `spacing`.

  A scan is acquired at ~1 mm and `nifti.load_volume` low-passes it before sampling a coarser
  grid, which keeps the magnitude noise's mean (the bright floor of the background) and shrinks
  its fluctuation by the filter's gain (1/12 at 4 mm). Noise of the 1 mm amplitude on every 4 mm
  voxel would make a cohort no real scan resembles, and whose noise no autoencoder can
  reconstruct: the noise-free image itself scores only SSIM 0.89 against it.
  """
  noisy = np.abs(t1 + noise_std_1mm * rng.standard_normal(t1.shape, dtype=np.float32))
  gain = nifti.antialias_noise_gain(spacing)
  if gain == 1.0:
    return noisy
  mean = _rician_mean(t1, noise_std_1mm)
  return mean + np.float32(gain) * (noisy - mean)


def template_icv_ml() -> float:
  """Intracranial volume (mL) of the template: its labelled voxels at 1 mm."""
  return float(np.count_nonzero(load_template(1.0).labels > 0)) / 1000.0


def label_volumes(labels: np.ndarray, spacing: float) -> tuple[float, float]:
  """(ventricular mL, GM + WM mL) from a label map."""
  voxel_ml = spacing**3 / 1000.0
  ventricles = np.count_nonzero(labels == LABEL_VENTRICLE) * voxel_ml
  brain = np.count_nonzero((labels == LABEL_GM) | (labels == LABEL_WM)) * voxel_ml
  return float(ventricles), float(brain)


def subject_id(index: int) -> str:
  return f"sub-{index + 1:04d}"


def make_subject(out_dir: str, index: int, seed: int, spacing: float, shape: Sequence[int],
                 write_labels: bool = False) -> dict:
  """Synthesize subject `index` (its own RNG stream) and write it; returns its TSV row."""
  rng = np.random.default_rng([int(seed), int(index)])
  params = draw_params(rng)
  image, labels = synthesize(params, rng, shape, spacing)
  sid = subject_id(index)
  affine = nifti.mni_affine(shape, spacing)
  anat = os.path.join(out_dir, sid, "anat")
  nifti.save_volume(os.path.join(anat, f"{sid}_T1w.nii.gz"), image, affine, dtype="int16",
                    mni=True)
  if write_labels:
    nifti.save_volume(os.path.join(anat, f"{sid}_dseg.nii.gz"), labels, affine, dtype="uint8",
                      mni=True)
  ventricles, brain = label_volumes(labels, spacing)
  return {"participant_id": sid, "age": f"{params.age:.2f}", "sex": "M" if params.sex else "F",
          "ventricular_volume": f"{ventricles:.3f}", "brain_volume": f"{brain:.3f}",
          "head_scale": f"{params.head_scale:.8f}"}


def _tsv(rows: list[dict]) -> str:
  lines = ["\t".join(PARTICIPANT_COLUMNS)]
  lines += ["\t".join(row[c] for c in PARTICIPANT_COLUMNS) for row in rows]
  return "\n".join(lines) + "\n"


def make_cohort(out_dir: str, num_subjects: int, seed: int, spacing: float,
                shape: Sequence[int], *, write_labels: bool = False,
                progress: Callable[[int, int], None] | None = None) -> str:
  """Write a BIDS cohort of `num_subjects` synthetic T1w images; returns participants.tsv.

  Same arguments -> same bytes. `progress(done, total)` is called after each subject.
  """
  if num_subjects < 1:
    raise ValueError(f"num_subjects={num_subjects} must be >= 1")
  shape = tuple(int(n) for n in shape)
  os.makedirs(out_dir, exist_ok=True)
  rows = []
  for index in range(num_subjects):
    rows.append(make_subject(out_dir, index, seed, spacing, shape, write_labels))
    if progress is not None:
      progress(index + 1, num_subjects)
  description = {"Name": "brain_ldm_jax synthetic MNI152 cohort", "BIDSVersion": "1.8.0",
                 "DatasetType": "derivative",
                 "GeneratedBy": [{"Name": "brain_ldm_jax.data.synthetic"}],
                 "SynthesisParameters": _params(num_subjects, seed, spacing, shape)}
  files.write_text_atomic(os.path.join(out_dir, "dataset_description.json"),
                     json.dumps(description, indent=2) + "\n")
  tsv = os.path.join(out_dir, "participants.tsv")
  files.write_text_atomic(tsv, _tsv(rows))
  return tsv


def _params(num_subjects: int, seed: int, spacing: float, shape: Sequence[int]) -> dict:
  return {"num_subjects": int(num_subjects), "seed": int(seed), "spacing": float(spacing),
          "shape": [int(n) for n in shape]}


def cohort_shape(data_config) -> tuple[int, int, int]:
  """The cohort grid: the training field of view (data.shape at data.spacing) at the cohort's
  spacing; equal to data.shape when both spacings agree."""
  fov = np.asarray(data_config.shape, np.float64) * float(data_config.spacing)
  return tuple(int(n) for n in np.round(fov / float(data_config.synthetic.spacing)))


def _progress_logger(what: str) -> Callable[[int, int], None]:
  start = time.monotonic()

  def log(done: int, total: int) -> None:
    elapsed = time.monotonic() - start
    eta = elapsed / done * (total - done)
    logging.info("%s: %d/%d subjects, %.1f s elapsed, ETA %.0f s", what, done, total, elapsed, eta)
  return log


def _is_complete(out_dir: str, params: dict) -> bool:
  marker = os.path.join(out_dir, COMPLETE_MARKER)
  try:
    with open(marker, encoding="utf-8") as f:
      return json.load(f) == params
  except (OSError, ValueError):
    return False


def build_cohort(out_dir: str, data_config) -> str:
  """Make the configured cohort in `out_dir` unless a complete one with the same parameters is
  there (the marker is written last, so an interrupted run is remade). Process 0 writes; every
  process waits for it. Returns `out_dir`."""
  synth = data_config.synthetic
  shape = cohort_shape(data_config)
  params = _params(synth.num_subjects, synth.seed, synth.spacing, shape)
  if jax.process_index() == 0 and not _is_complete(out_dir, params):
    if os.path.isdir(out_dir):
      logging.info("Remaking incomplete or different synthetic cohort in %s", out_dir)
      shutil.rmtree(out_dir)
    logging.info("Making a synthetic cohort in %s: %s", out_dir, params)
    load_template(float(synth.spacing))  # before the clock starts, so the ETA is about subjects
    make_cohort(out_dir, synth.num_subjects, synth.seed, float(synth.spacing), shape,
                progress=_progress_logger(out_dir))
    files.write_text_atomic(os.path.join(out_dir, COMPLETE_MARKER), json.dumps(params))
  multihost.barrier("synthetic_cohort")
  return out_dir


def ensure_cohort(config, workdir: str) -> str:
  """The data folder of a run: config.data.data_dir, or the synthetic cohort in <workdir>/cohort
  (made, reused when complete, remade when not)."""
  if config.data.data_dir:
    return config.data.data_dir
  return build_cohort(os.path.join(workdir, "cohort"), config.data)
