"""Draw and render the trials of a real-vs-synthetic reader study.

Design (what keeps the study blind and fair):
- Trials come in matched pairs: for each drawn view (a plane and relative position, or a triplet
  point) one real and one synthetic trial are made at the SAME relative anatomical position, i.e.
  the same fraction of each volume's foreground bounding box. So every cell (trial type x class)
  holds exactly num_trials / (2 * len(trial_types)) trials, and views do not differ by class.
- Real and synthetic images go through the same path: canonical (RAS+) orientation, one display
  grid shared by all volumes (square pixels at one mm-per-pixel scale), one intensity window
  (pooled over both classes with equal weight, or each volume's own percentiles, same rule for
  all), one PNG encoder with stored (uncompressed) data, so image byte sizes depend only on the
  plane, never on the class.
- Each class contributes the same number of distinct volumes, each used equally often, so repeats
  are no clue either.
- Presentation order is a seeded shuffle; trial ids are random tokens from `secrets`, unrelated to
  the seed, the order or the class.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from typing import Sequence

import numpy as np

from brain_ldm_jax import figures
from brain_ldm_jax.data import nifti
from brain_ldm_jax.errors import ConfigError, DataError

CLASSES = ("real", "synthetic")
TRIAL_TYPES = ("slice", "triplet")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
_FOREGROUND_FRACTION = 0.1  # of each volume's own percentile range: the bounding-box threshold
_PERCENTILE_SAMPLE = 200_000  # voxels kept per volume to pool the window


@dataclasses.dataclass(frozen=True)
class View:
  """Where a trial looks: one plane at a relative position, or three planes through a point."""
  trial_type: str  # "slice" | "triplet"
  planes: tuple[str, ...]  # ("axial",) or ("axial", "coronal", "sagittal")
  position: tuple[float, float, float]  # relative (x, y, z) in each volume's foreground box


@dataclasses.dataclass(frozen=True)
class TrialSpec:
  """One trial before rendering: its id, truth, view and source volume."""
  trial_id: str
  truth: str  # "real" | "synthetic"
  view: View
  source: str  # path of the NIfTI file


def find_volumes(folder: str, field: str) -> list[str]:
  """All *.nii / *.nii.gz files under `folder` (recursive), sorted; DataError if none.

  Args:
    folder: directory to search.
    field: config field name for error messages, e.g. "config.reader_study.real_dir".
  """
  if not folder:
    raise ConfigError(f"{field} is empty: set it to a folder of NIfTI volumes "
                      f"(--{field}=DIR)")
  if not os.path.isdir(folder):
    raise DataError(f"{field}={folder!r} is not a directory")
  found = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in files:
      if name.endswith(NIFTI_SUFFIXES) and not name.startswith("."):
        found.append(os.path.join(root, name))
  if not found:
    raise DataError(f"{field}={folder!r} holds no .nii or .nii.gz files (searched recursively)")
  return sorted(found)


@dataclasses.dataclass(frozen=True)
class Grid:
  """A run's MNI grid (data.shape at data.spacing mm): real and synthetic volumes alike are put on
  it, so neither field of view nor voxel size can tell the classes apart."""
  shape: tuple[int, int, int]
  spacing: float
  assume_mni: bool = False

  @classmethod
  def from_config(cls, data_config) -> Grid:
    return cls(tuple(int(n) for n in data_config.shape), float(data_config.spacing),
               bool(data_config.get("assume_mni", False)))


def load_on_grid(path: str, grid: Grid) -> tuple[np.ndarray, tuple[float, float, float]]:
  """A NIfTI volume on the grid (nifti.load_volume, min-max scaled: the study sets its own
  window), and the grid's voxel spacing in mm."""
  volume, _ = nifti.load_volume(path, grid.shape, grid.spacing, clip_percentiles=None,
                                assume_mni=grid.assume_mni)
  return volume, (grid.spacing,) * 3


def load_canonical(path: str) -> tuple[np.ndarray, tuple[float, float, float]]:
  """A NIfTI volume as float32 (x, y, z) in RAS+ orientation, and its voxel spacing in mm."""
  import nibabel as nib  # pylint: disable=import-outside-toplevel
  try:
    img = nib.as_closest_canonical(nib.load(path))
    data = np.asarray(img.get_fdata(dtype=np.float32))
  except Exception as e:  # nibabel raises many types for unreadable files
    raise DataError(f"{path}: cannot read as NIfTI ({e})") from e
  if data.ndim > 3 and all(d == 1 for d in data.shape[3:]):
    data = data.reshape(data.shape[:3])
  if data.ndim != 3:
    raise DataError(f"{path}: expected a 3D volume, got shape {data.shape}")
  zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
  if not all(z > 0 for z in zooms):
    raise DataError(f"{path}: voxel sizes {zooms} must be positive")
  return data, zooms


def draw_views(num_pairs_per_type: int, trial_types: Sequence[str],
               position_range: tuple[float, float], rng: np.random.Generator) -> list[View]:
  """Views for each trial type; slice views cycle axial/coronal/sagittal for balance."""
  lo, hi = position_range
  views = []
  for trial_type in trial_types:
    plane_offset = int(rng.integers(3))
    for i in range(num_pairs_per_type):
      pos = tuple(float(p) for p in rng.uniform(lo, hi, size=3))
      if trial_type == "slice":
        planes = (figures.PLANES[(i + plane_offset) % 3],)
      else:
        planes = figures.PLANES
      views.append(View(trial_type, planes, pos))
  return views


def assign_sources(n: int, paths: Sequence[str], rng: np.random.Generator) -> list[str]:
  """`n` volumes drawn so each is used as evenly as possible (shuffled rounds without repeats)."""
  out: list[str] = []
  while len(out) < n:
    out.extend(paths[i] for i in rng.permutation(len(paths)))
  return out[:n]


def _subset(paths: Sequence[str], k: int, rng: np.random.Generator) -> list[str]:
  return [paths[i] for i in sorted(rng.choice(len(paths), size=k, replace=False))]


def plan_trials(real_paths: Sequence[str], synthetic_paths: Sequence[str], num_trials: int,
                trial_types: Sequence[str], position_range: tuple[float, float],
                seed: int) -> list[TrialSpec]:
  """The balanced, matched, shuffled trial list (presentation order). Ids are random tokens."""
  trial_types = check_trial_types(trial_types)
  cells = 2 * len(trial_types)
  if num_trials <= 0 or num_trials % cells:
    raise ConfigError(
        f"config.reader_study.num_trials={num_trials} must be a positive multiple of {cells} "
        f"(2 classes x {len(trial_types)} trial types) so that every cell is balanced")
  lo, hi = (float(p) for p in position_range)
  if not 0.0 <= lo <= hi <= 1.0:
    raise ConfigError(f"config.reader_study.position_range={tuple(position_range)} must satisfy "
                      "0 <= low <= high <= 1")
  rng = np.random.default_rng(seed)
  views = draw_views(num_trials // cells, trial_types, (lo, hi), rng)
  # The same number of distinct volumes per class, so that how often a brain comes back (a
  # reader may recognise a repeat) is no clue to its class.
  k = min(len(real_paths), len(synthetic_paths), len(views))
  real = assign_sources(len(views), _subset(real_paths, k, rng), rng)
  synthetic = assign_sources(len(views), _subset(synthetic_paths, k, rng), rng)
  specs = []
  for view, r, s in zip(views, real, synthetic):
    specs.append(TrialSpec(_token(), "real", view, r))
    specs.append(TrialSpec(_token(), "synthetic", view, s))
  order = rng.permutation(len(specs))
  return [specs[i] for i in order]


def check_trial_types(trial_types: Sequence[str]) -> tuple[str, ...]:
  if isinstance(trial_types, str):
    trial_types = (trial_types,)
  types = tuple(str(t) for t in trial_types)
  bad = [t for t in types if t not in TRIAL_TYPES]
  if not types or bad or len(set(types)) != len(types):
    raise ConfigError(f"config.reader_study.trial_types={types!r}: use distinct values from "
                      f"{TRIAL_TYPES}")
  return types


def _token() -> str:
  # From the OS's CSPRNG, not the study seed: an id says nothing about order, seed or class.
  return "t" + secrets.token_hex(6)


# ----------------------------------------------------------------------------- rendering


@dataclasses.dataclass
class _Loaded:
  """What one volume contributes: raw slices per trial, its voxel sample, shape and spacing."""
  shape: tuple[int, int, int]
  spacing: tuple[float, float, float]
  sample: np.ndarray
  own_window: tuple[float, float]
  slices: dict  # (trial_id, plane) -> (raw 2D slice, voxel index)


def foreground_box(volume: np.ndarray, window: tuple[float, float]) -> list[tuple[int, int]]:
  """Per-axis (first, last) index of voxels above a low threshold; the whole axis if none."""
  lo, hi = window
  mask = volume > lo + _FOREGROUND_FRACTION * (hi - lo)
  box = []
  for axis in range(3):
    other = tuple(a for a in range(3) if a != axis)
    hits = np.flatnonzero(mask.any(axis=other))
    box.append((int(hits[0]), int(hits[-1])) if hits.size else (0, volume.shape[axis] - 1))
  return box


def _position_index(box: tuple[int, int], fraction: float) -> int:
  first, last = box
  return int(round(first + fraction * (last - first)))


def load_trial_slices(specs: Sequence[TrialSpec], percentiles: tuple[float, float],
                      grid: Grid | None = None) -> dict[str, _Loaded]:
  """Load each source volume once (onto `grid`, else as it is) and keep only the raw slices its
  trials need."""
  by_source: dict[str, list[TrialSpec]] = {}
  for spec in specs:
    by_source.setdefault(spec.source, []).append(spec)
  loaded = {}
  for source, its_specs in by_source.items():
    volume, spacing = load_canonical(source) if grid is None else load_on_grid(source, grid)
    finite = volume[np.isfinite(volume)]
    if finite.size == 0:
      raise DataError(f"{source}: the volume holds no finite values")
    own = figures.common_window([finite], (), percentiles)
    box = foreground_box(np.nan_to_num(volume, nan=own[0]), own)
    slices = {}
    for spec in its_specs:
      for plane in spec.view.planes:
        axis = figures.PLANE_AXIS[plane]
        index = _position_index(box[axis], spec.view.position[axis])
        slices[(spec.trial_id, plane)] = (figures.extract_slice(volume, plane, index).copy(),
                                          index)
    stride = max(1, finite.size // _PERCENTILE_SAMPLE)
    loaded[source] = _Loaded(tuple(volume.shape), spacing, finite[::stride].copy(), own, slices)
  return loaded


def display_shapes(loaded: Sequence[_Loaded], display_size: int) -> dict:
  """One (rows, cols) per plane for ALL volumes: median physical extent at one mm/pixel scale.

  Sharing the shape across classes keeps image size from being a clue; one mm/pixel scale across
  planes keeps a triplet's three views in proportion.
  """
  extents = {plane: [] for plane in figures.PLANES}
  for item in loaded:
    for plane in figures.PLANES:
      r_axis, c_axis = figures.PLANE_DISPLAY_AXES[plane]
      extents[plane].append((item.shape[r_axis] * item.spacing[r_axis],
                             item.shape[c_axis] * item.spacing[c_axis]))
  median = {p: np.median(np.asarray(e), axis=0) for p, e in extents.items()}
  mm_per_pixel = max(float(np.max(m)) for m in median.values()) / float(display_size)
  return {p: (max(8, int(round(m[0] / mm_per_pixel))), max(8, int(round(m[1] / mm_per_pixel))))
          for p, m in median.items()}


def render_trials(specs: Sequence[TrialSpec], percentiles: tuple[float, float],
                  window_mode: str, display_size: int,
                  grid: Grid | None = None) -> tuple[dict, dict]:
  """PNG bytes per trial (list, in plane order) and the rendering facts for the key.

  Returns:
    (images, info): images[trial_id] = [png bytes, ...]; info has the window(s), display shapes
    and each trial's voxel indices.
  """
  if window_mode not in ("pooled", "per_volume"):
    raise ConfigError(f"config.reader_study.window={window_mode!r}: use 'pooled' (one window "
                      "from both classes, equal weight) or 'per_volume'")
  if not 16 <= int(display_size) <= 1024:
    raise ConfigError(f"config.reader_study.display_size={display_size} must be in [16, 1024]")
  loaded = load_trial_slices(specs, percentiles, grid)
  truth_of = {s.source: s.truth for s in specs}
  sources = list(loaded)
  shapes = [loaded[s].shape for s in sources]
  planes_shape = display_shapes([loaded[s] for s in sources], int(display_size))
  _warn_if_grids_differ(sources, shapes, [loaded[s].spacing for s in sources], truth_of)

  pooled = None
  if window_mode == "pooled":
    by_class = {c: [loaded[s].sample for s in sources if truth_of[s] == c] for c in CLASSES}
    pooled = figures.common_window(by_class["real"], by_class["synthetic"], percentiles)
    _warn_if_scales_differ(by_class, percentiles)

  images, indices = {}, {}
  for spec in specs:
    item = loaded[spec.source]
    window = pooled if pooled is not None else item.own_window
    pngs, idx = [], []
    for plane in spec.view.planes:
      raw, index = item.slices[(spec.trial_id, plane)]
      pixels = figures.apply_window(figures.resize(raw, planes_shape[plane]), window)
      pngs.append(figures.encode_png(pixels, compress=False))
      idx.append(index)
    images[spec.trial_id] = pngs
    indices[spec.trial_id] = idx
  info = {
      "window_mode": window_mode,
      "pooled_window": list(pooled) if pooled is not None else None,
      "display_shapes": {p: list(s) for p, s in planes_shape.items()},
      "voxel_indices": indices,
      "per_volume_windows": {s: list(loaded[s].own_window) for s in sources},
  }
  return images, info


def _warn_if_grids_differ(sources, shapes, spacings, truth_of) -> None:
  """Different fields of view per class would give the class away whatever we do: say so."""
  extents = {c: [] for c in CLASSES}
  for source, shape, spacing in zip(sources, shapes, spacings):
    extents[truth_of[source]].append(np.asarray(shape) * np.asarray(spacing))
  if all(extents.values()):
    a, b = (np.median(np.asarray(extents[c]), axis=0) for c in CLASSES)
    if np.any(np.abs(a - b) > 0.05 * np.maximum(a, b)):
      logging.warning("reader study: real and synthetic volumes cover different fields of view "
                      "(median %s mm vs %s mm); readers may tell them apart by shape alone. "
                      "Put both on the same grid first.", np.round(a, 1), np.round(b, 1))


def _warn_if_scales_differ(by_class, percentiles) -> None:
  """A pooled window needs both classes on one intensity scale; warn when they are not."""
  highs = {c: figures.common_window(v, (), percentiles)[1] for c, v in by_class.items() if v}
  if len(highs) == 2:
    a, b = abs(highs["real"]), abs(highs["synthetic"])
    if min(a, b) > 0 and max(a, b) / min(a, b) > 2.0:
      logging.warning("reader study: real and synthetic intensities differ in scale (upper "
                      "percentile %.4g vs %.4g); with window='pooled' one class will look darker. "
                      "Normalise both the same way or use window='per_volume'.",
                      highs["real"], highs["synthetic"])
