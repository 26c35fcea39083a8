"""Figures that respect perception; every report the project writes uses these.

Rules they follow (Cleveland & McGill; Borland & Taylor):
- Brain images are grayscale, and images that are compared share ONE intensity window
  (`common_window`), so that a brighter sample looks brighter rather than being renormalised.
- Quantities are compared by position on a common scale, never by bar length, area or hue
  (the charts are in charts.py).
- Every file is written atomically (temp file in the same folder, then rename), so a report never
  links a half-written image.

Array convention: volumes are 3D arrays indexed (x, y, z) in RAS+ orientation (what
`nib.as_closest_canonical` gives). Slices are shown in neurological convention (patient's left on
the image's left), superior / anterior up.

matplotlib is imported inside the functions (Agg backend), so importing this module is cheap.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from typing import Sequence

import numpy as np

from brain_ldm_jax import files
from brain_ldm_jax.errors import ConfigError, DataError

DEFAULT_PERCENTILES = (0.5, 99.5)
_MAX_VOXELS_PER_SET = 2_000_000  # enough for stable percentiles; bounds memory and time


# ----------------------------------------------------------------------------- intensity window


def _sample_voxels(volumes: Sequence[np.ndarray], budget: int) -> np.ndarray:
  """About `budget` voxels drawn evenly (fixed stride) from a set, so big sets stay cheap."""
  volumes = [np.asarray(v, np.float32) for v in volumes]
  if not volumes:
    return np.zeros((0,), np.float32)
  per_volume = max(1, budget // len(volumes))
  parts = []
  for v in volumes:
    flat = v.reshape(-1)
    stride = max(1, flat.size // per_volume)
    parts.append(flat[::stride])
  return np.concatenate(parts)


def common_window(volumes_a: Sequence[np.ndarray],
                  volumes_b: Sequence[np.ndarray] = (),
                  percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> tuple[float, float]:
  """One intensity window (lo, hi) for two sets of volumes, from their pooled voxels.

  The two sets are pooled with EQUAL weight (the same number of voxels from each), so a large set
  of real scans cannot define the window alone and a smaller synthetic set is not judged on a
  window fitted to the other. Non-finite voxels are ignored.

  Args:
    volumes_a: arrays of any shape (e.g. real volumes).
    volumes_b: arrays of any shape (e.g. synthetic volumes); may be empty.
    percentiles: (low, high) percentiles in [0, 100].

  Returns:
    (lo, hi) floats with hi > lo.
  """
  lo_p, hi_p = check_percentiles(percentiles)
  sets = [s for s in (list(volumes_a), list(volumes_b)) if s]
  if not sets:
    raise DataError("common_window: no volumes given")
  budget = _MAX_VOXELS_PER_SET
  samples = [_sample_voxels(s, budget) for s in sets]
  n = min(x.size for x in samples)
  # Equal weight per set: subsample each to the smaller one's count with a fixed stride.
  pooled = np.concatenate([x[np.linspace(0, x.size - 1, n).astype(np.int64)] for x in samples])
  pooled = pooled[np.isfinite(pooled)]
  if pooled.size == 0:
    raise DataError("common_window: the volumes hold no finite values")
  lo, hi = np.percentile(pooled, [lo_p, hi_p])
  lo, hi = float(lo), float(hi)
  if not hi > lo:  # a constant image: any non-empty window shows it uniformly
    hi = lo + 1.0
  return lo, hi


def check_percentiles(percentiles: Sequence[float]) -> tuple[float, float]:
  """(low, high) as floats; ConfigError unless 0 <= low < high <= 100."""
  try:
    lo_p, hi_p = (float(p) for p in percentiles)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"percentiles={percentiles!r} must be two numbers (low, high)") from e
  if not 0.0 <= lo_p < hi_p <= 100.0:
    raise ConfigError(f"percentiles={percentiles!r} must satisfy 0 <= low < high <= 100")
  return lo_p, hi_p


def apply_window(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
  """Map [lo, hi] linearly to 0..255 (clipped) as uint8; the only intensity mapping we use."""
  lo, hi = float(window[0]), float(window[1])
  if not hi > lo:
    raise ConfigError(f"window={window!r}: high must exceed low")
  scaled = (np.asarray(image, np.float32) - lo) / (hi - lo)
  scaled = np.nan_to_num(scaled, nan=0.0, posinf=1.0, neginf=0.0)
  return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------- slices


def resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Bilinear resample of a 2D image to exactly `shape` (corner-aligned); float32."""
  # scipy on first use only: slow to import, and most figures never resize.
  from scipy import ndimage  # pylint: disable=import-outside-toplevel
  image = np.asarray(image, np.float32)
  rows = np.linspace(0.0, image.shape[0] - 1.0, int(shape[0]))
  cols = np.linspace(0.0, image.shape[1] - 1.0, int(shape[1]))
  grid = np.meshgrid(rows, cols, indexing="ij")
  return ndimage.map_coordinates(image, grid, order=1, mode="nearest").astype(np.float32)


def slice_index(size: int, fraction: float) -> int:
  """Index at relative position `fraction` in [0, 1] along an axis of `size` voxels."""
  return int(min(size - 1, max(0, round(fraction * (size - 1)))))


def extract_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
  """One display-oriented 2D slice of an RAS+ volume: 'axial' | 'coronal' | 'sagittal'.

  Axial: anterior up, patient's left on the left; coronal and sagittal: superior up (sagittal:
  anterior on the right).
  """
  v = np.asarray(volume)
  if plane == "axial":
    s = v[:, :, index]  # (x, y)
  elif plane == "coronal":
    s = v[:, index, :]  # (x, z)
  elif plane == "sagittal":
    s = v[index, :, :]  # (y, z)
  else:
    raise ConfigError(f"plane={plane!r} must be 'axial', 'coronal' or 'sagittal'")
  # rot90 puts the second array axis (anterior or superior) upward, the first left-to-right.
  return np.rot90(s)


PLANES = ("axial", "coronal", "sagittal")
# Which volume axis each plane cuts through, and the (rows, cols) axes of the displayed slice.
PLANE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
PLANE_DISPLAY_AXES = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}


def orthogonal_slices(volume: np.ndarray,
                      position: Sequence[float] = (0.5, 0.5, 0.5),
                      spacing: Sequence[float] | None = None) -> list[np.ndarray]:
  """[axial, coronal, sagittal] slices through relative point `position` (x, y, z fractions).

  With `spacing` (mm per voxel along x, y, z), slices are resampled to square pixels so that
  anisotropic volumes keep their true shape.
  """
  volume = _as_volume(volume)
  out = []
  for plane in PLANES:
    axis = PLANE_AXIS[plane]
    s = extract_slice(volume, plane, slice_index(volume.shape[axis], position[axis]))
    if spacing is not None:
      s = resize(s, square_pixel_shape(s.shape, spacing, plane))
    out.append(np.asarray(s, np.float32))
  return out


def square_pixel_shape(shape: tuple[int, int], spacing: Sequence[float],
                       plane: str) -> tuple[int, int]:
  """Display shape of a slice so its pixels are square, keeping the finer spacing's resolution."""
  r_axis, c_axis = PLANE_DISPLAY_AXES[plane]
  r_mm, c_mm = shape[0] * float(spacing[r_axis]), shape[1] * float(spacing[c_axis])
  pixel = min(float(spacing[r_axis]), float(spacing[c_axis]))
  return max(1, round(r_mm / pixel)), max(1, round(c_mm / pixel))


def _as_volume(volume) -> np.ndarray:
  v = np.asarray(volume, np.float32)
  v = v.reshape(v.shape[:3]) if v.ndim > 3 and all(d == 1 for d in v.shape[3:]) else v
  if v.ndim != 3:
    raise DataError(f"expected a 3D volume, got an array of shape {np.shape(volume)}")
  return v


# ----------------------------------------------------------------------------- montages


def montage_array(volumes: Sequence[np.ndarray],
                  window: tuple[float, float] | None = None,
                  position: Sequence[float] = (0.5, 0.5, 0.5),
                  spacing: Sequence[float] | None = None,
                  gap: int = 2,
                  percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> np.ndarray:
  """Orthogonal slices of several volumes side by side as one uint8 (H, W) image.

  Columns are volumes; rows are axial, coronal, sagittal. All volumes share one window: `window`
  if given, else `common_window(volumes)`. Cells are centred on a black background when shapes
  differ. Suitable for TensorBoard (add a channel axis there if it wants one).
  """
  volumes = [_as_volume(v) for v in volumes]
  if not volumes:
    raise DataError("montage_array: no volumes given")
  if window is None:
    window = common_window(volumes, (), percentiles)
  slices = [[apply_window(s, window) for s in orthogonal_slices(v, position, spacing)]
            for v in volumes]
  row_heights = [max(col[r].shape[0] for col in slices) for r in range(3)]
  col_widths = [max(s.shape[1] for s in col) for col in slices]
  height = sum(row_heights) + gap * 2
  width = sum(col_widths) + gap * (len(volumes) - 1)
  canvas = np.zeros((height, width), np.uint8)
  x = 0
  for col, w in zip(slices, col_widths):
    y = 0
    for r, h in enumerate(row_heights):
      s = col[r]
      oy, ox = y + (h - s.shape[0]) // 2, x + (w - s.shape[1]) // 2
      canvas[oy:oy + s.shape[0], ox:ox + s.shape[1]] = s
      y += h + gap
    x += w + gap
  return canvas


def sample_title(covariates: dict) -> str:
  """A short montage title: '71 y M, V 32 mL' (age, sex, ventricular volume when present)."""
  parts = []
  if "age" in covariates:
    parts.append(f"{covariates['age']:.0f} y")
  if "sex" in covariates:
    parts.append("M" if covariates["sex"] >= 0.5 else "F")
  if "ventricular_volume" in covariates:
    parts.append(f"V {covariates['ventricular_volume']:.0f} mL")
  return " ".join(parts)


def save_montage_png(volumes: Sequence[np.ndarray],
                     path: str | os.PathLike,
                     titles: Sequence[str] | None = None,
                     window: tuple[float, float] | None = None,
                     position: Sequence[float] = (0.5, 0.5, 0.5),
                     spacing: Sequence[float] | None = None,
                     suptitle: str | None = None,
                     scale: float = 2.0) -> tuple[float, float]:
  """Write a grayscale montage (columns = volumes) with optional titles; returns the window used.

  Pixels are drawn one-to-one (times `scale`, nearest neighbour), so what is saved is exactly
  `montage_array` with the same window. Pass one `window` (e.g. from `common_window(real,
  synthetic)`) to every montage that will be compared.
  """
  volumes = [_as_volume(v) for v in volumes]
  if titles is not None and len(titles) != len(volumes):
    raise ConfigError(f"titles has {len(titles)} entries for {len(volumes)} volumes")
  if window is None:
    window = common_window(volumes)
  gap = 2
  image = montage_array(volumes, window, position, spacing, gap=gap)
  plt = pyplot()
  dpi = 100.0
  title_px = 18 if titles else 0
  sup_px = 22 if suptitle else 0
  h, w = image.shape
  fig_w, fig_h = w * scale / dpi, (h * scale + title_px + sup_px) / dpi
  fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
  try:
    ax = fig.add_axes((0.0, 0.0, 1.0, h * scale / dpi / fig_h))
    # vmin/vmax fixed to the uint8 range: the window was applied already, identically for all.
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_axis_off()
    if titles:
      col_widths = [max(s.shape[1] for s in orthogonal_slices(v, position, spacing))
                    for v in volumes]
      x = 0
      for title, cw in zip(titles, col_widths):
        fig.text((x + cw / 2) * scale / dpi / fig_w, (h * scale + 3) / dpi / fig_h, str(title),
                 ha="center", va="bottom", fontsize=8)
        x += cw + gap
    if suptitle:
      fig.suptitle(suptitle, fontsize=9, y=1.0 - 2 / dpi / fig_h, va="top")
    save_figure(fig, path, dpi=dpi)
  finally:
    plt.close(fig)
  return window


def rows_array(volumes: Sequence[np.ndarray],
               window: tuple[float, float],
               position: Sequence[float] = (0.5, 0.5, 0.5),
               spacing: Sequence[float] | None = None,
               gap: int = 2) -> np.ndarray:
  """`montage_array` turned on its side: one row per volume (axial, coronal, sagittal), uint8."""
  volumes = [_as_volume(v) for v in volumes]
  if not volumes:
    raise DataError("rows_array: no volumes given")
  slices = [[apply_window(s, window) for s in orthogonal_slices(v, position, spacing)]
            for v in volumes]
  col_widths = [max(row[c].shape[1] for row in slices) for c in range(3)]
  row_heights = [max(s.shape[0] for s in row) for row in slices]
  canvas = np.zeros((sum(row_heights) + gap * (len(volumes) - 1), sum(col_widths) + gap * 2),
                    np.uint8)
  y = 0
  for row, h in zip(slices, row_heights):
    x = 0
    for s, w in zip(row, col_widths):
      oy, ox = y + (h - s.shape[0]) // 2, x + (w - s.shape[1]) // 2
      canvas[oy:oy + s.shape[0], ox:ox + s.shape[1]] = s
      x += w + gap
    y += h + gap
  return canvas


def save_rows_png(volumes: Sequence[np.ndarray],
                  path: str | os.PathLike,
                  labels: Sequence[str],
                  window: tuple[float, float] | None = None,
                  spacing: Sequence[float] | None = None,
                  suptitle: str | None = None,
                  scale: float = 2.0) -> tuple[float, float]:
  """One row per volume, labelled on the left (e.g. a covariate sweep); returns the window."""
  volumes = [_as_volume(v) for v in volumes]
  if len(labels) != len(volumes):
    raise ConfigError(f"labels has {len(labels)} entries for {len(volumes)} volumes")
  if window is None:
    window = common_window(volumes)
  gap = 2
  image = rows_array(volumes, window, spacing=spacing, gap=gap)
  plt = pyplot()
  dpi, label_px = 100.0, 90
  sup_px = 10 + 12 * len(suptitle.splitlines()) if suptitle else 0
  h, w = image.shape
  fig_w, fig_h = (w * scale + label_px) / dpi, (h * scale + sup_px) / dpi
  fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
  try:
    ax = fig.add_axes((label_px / dpi / fig_w, 0.0, w * scale / dpi / fig_w,
                       h * scale / dpi / fig_h))
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_axis_off()
    heights = [max(s.shape[0] for s in orthogonal_slices(v, spacing=spacing)) for v in volumes]
    y = 0
    for label, rh in zip(labels, heights):
      fig.text((label_px - 6) / dpi / fig_w, 1.0 - (sup_px + (y + rh / 2) * scale) / dpi / fig_h,
               str(label), ha="right", va="center", fontsize=8)
      y += rh + gap
    if suptitle:
      fig.suptitle(suptitle, fontsize=9, y=1.0 - 2 / dpi / fig_h, va="top")
    save_figure(fig, path, dpi=dpi)
  finally:
    plt.close(fig)
  return window


# ----------------------------------------------------------------------------- files


def encode_png(image: np.ndarray, compress: bool = True) -> bytes:
  """A minimal 8-bit grayscale PNG (IHDR, IDAT, IEND only: no text, time or other metadata).

  With `compress=False` the pixel data is stored (zlib level 0), so the file size depends only on
  the image's dimensions, never its content; the reader study relies on that.
  """
  image = np.asarray(image)
  if image.ndim != 2 or image.dtype != np.uint8:
    raise DataError(f"encode_png wants a 2D uint8 array, got {image.dtype} {image.shape}")
  h, w = image.shape
  raw = np.concatenate([np.zeros((h, 1), np.uint8), image], axis=1).tobytes()  # filter 0 rows
  data = zlib.compress(raw, 9 if compress else 0)

  def chunk(tag: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + tag + payload
            + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF))

  ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit, grayscale, no interlace
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
  """Write a uint8 grayscale image (e.g. `montage_array`) as a metadata-free PNG, atomically."""
  files.write_bytes_atomic(path, encode_png(image))


def save_figure(fig, path: str | os.PathLike, dpi: float | None = None) -> None:
  """A matplotlib figure written atomically, with no version stamp (same plot, same bytes)."""
  buf = io.BytesIO()
  fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
  # metadata Software=None: no matplotlib version stamp in the file.
  metadata = {"Software": None} if fmt == "png" else None
  fig.savefig(buf, format=fmt, dpi=dpi, metadata=metadata)
  files.write_bytes_atomic(path, buf.getvalue())


def pyplot():
  """matplotlib's pyplot on the file-only Agg backend, imported on first use (it is slow)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt
