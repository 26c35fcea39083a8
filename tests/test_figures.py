"""figures.py and charts.py: valid PNGs, one shared window, position-on-a-common-scale charts."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest

from brain_ldm_jax import charts
from brain_ldm_jax import figures
from brain_ldm_jax.errors import ConfigError, DataError


def _volume(seed: int, shape=(16, 20, 12), scale: float = 1.0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return (scale * rng.random(shape)).astype(np.float32)


def _read_png(path) -> tuple[int, int, list[str]]:
  """(width, height, chunk types) of a PNG file, checking every CRC."""
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  i, chunks, size = 8, [], None
  while i < len(data):
    (length,) = struct.unpack(">I", data[i:i + 4])
    tag, payload = data[i + 4:i + 8], data[i + 8:i + 8 + length]
    (crc,) = struct.unpack(">I", data[i + 8 + length:i + 12 + length])
    assert zlib.crc32(tag + payload) & 0xFFFFFFFF == crc
    if tag == b"IHDR":
      size = struct.unpack(">II", payload[:8])
    chunks.append(tag.decode("ascii"))
    i += 12 + length
  assert chunks[0] == "IHDR" and chunks[-1] == "IEND"
  return size[0], size[1], chunks


def test_same_window_gives_identical_pixels_for_identical_volumes():
  group_a = [_volume(1), _volume(2)]
  group_b = [v.copy() for v in group_a]
  brighter = [2.0 * v for v in group_a]
  window = figures.common_window(group_a, brighter)
  a = figures.montage_array(group_a, window)
  b = figures.montage_array(group_b, window)
  assert a.dtype == np.uint8 and a.ndim == 2
  np.testing.assert_array_equal(a, b)
  # Not renormalised per set: the brighter set is brighter under the shared window.
  assert figures.montage_array(brighter, window).mean() > a.mean() + 20
  # Per-set windows would have hidden the difference; this is what the shared window prevents.
  np.testing.assert_array_equal(figures.montage_array(group_a),
                                figures.montage_array(brighter))


def test_common_window_weights_sets_equally():
  small = [np.full((4, 4, 4), 10.0, np.float32)]
  large = [np.zeros((4, 4, 4), np.float32)] * 50
  lo, hi = figures.common_window(large, small, (0, 100))
  assert (lo, hi) == (0.0, 10.0)
  lo, hi = figures.common_window(large, small, (25, 75))
  assert lo == 0.0 and hi == 10.0  # half the pooled voxels come from each set
  with pytest.raises(ConfigError, match="percentiles"):
    figures.common_window(small, (), (90, 10))
  with pytest.raises(DataError):
    figures.common_window([], [])


def test_orientation_puts_superior_and_anterior_up():
  v = np.zeros((8, 10, 6), np.float32)
  v[:, :, -1] = 1.0  # the most superior plane
  v[:, -1, :] = 2.0  # the most anterior plane
  axial, coronal, sagittal = figures.orthogonal_slices(v, (0.5, 0.5, 0.5))
  assert axial.shape == (10, 8) and np.all(axial[0] == 2.0)  # anterior at the top
  assert coronal.shape == (6, 8) and np.all(coronal[0] == 1.0)  # superior at the top
  assert sagittal.shape == (6, 10) and np.all(sagittal[1:, -1] == 2.0)  # anterior on the right
  # Anisotropic voxels are resampled to square pixels.
  axial_mm = figures.orthogonal_slices(v, spacing=(1.0, 2.0, 1.0))[0]
  assert axial_mm.shape == (20, 8)


def test_montage_png_and_charts_are_valid_pngs(tmp_path):
  vols = [_volume(1), _volume(2), _volume(3)]
  path = tmp_path / "sub" / "montage.png"
  window = figures.save_montage_png(vols, path, titles=["a", "b", "c"], suptitle="samples")
  w, h, chunks = _read_png(path)
  assert w > 0 and h > 0 and "tEXt" not in chunks and "iTXt" not in chunks
  assert window == figures.common_window(vols)
  with pytest.raises(ConfigError, match="titles"):
    figures.save_montage_png(vols, tmp_path / "x.png", titles=["only one"])

  r = charts.scatter_requested_vs_measured([1, 2, 3, 4], [1.1, 2.2, 2.9, 4.2],
                                            tmp_path / "scatter.png", "age", "years")
  assert 0.9 < r <= 1.0
  _read_png(tmp_path / "scatter.png")
  assert np.isnan(charts.scatter_requested_vs_measured([1], [1], tmp_path / "one.png", "age",
                                                        "years"))
  charts.dot_plot({"real": [0.8, 0.82, 0.79], "synthetic": [0.7, 0.75], "paper": 0.77},
                   tmp_path / "dots.png", quantity="MS-SSIM", reference=0.5)
  _read_png(tmp_path / "dots.png")
  # Atomic writes leave no temp files behind.
  leftovers = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
  assert not leftovers


def test_encode_png_round_trip_and_size_independent_of_content(tmp_path):
  import matplotlib.image as mpimg
  rng = np.random.default_rng(0)
  noisy = rng.integers(0, 256, (12, 17), dtype=np.uint8)
  flat = np.zeros((12, 17), np.uint8)
  assert len(figures.encode_png(noisy, compress=False)) == \
      len(figures.encode_png(flat, compress=False))
  figures.save_png(noisy, tmp_path / "n.png")
  back = np.round(mpimg.imread(tmp_path / "n.png") * 255).astype(np.uint8)
  np.testing.assert_array_equal(back, noisy)
  assert _read_png(tmp_path / "n.png")[2] == ["IHDR", "IDAT", "IEND"]
  with pytest.raises(DataError):
    figures.encode_png(noisy.astype(np.float32))


def test_perceptual_colors_only_uniform_maps():
  assert len(charts.perceptual_colors(4, "cividis")) == 4
  with pytest.raises(ConfigError, match="perceptually uniform"):
    charts.perceptual_colors(3, "jet")
