"""Charts that compare quantities by position on one common scale (Cleveland & McGill).

Scatter plots of measured vs requested values share both axes and draw the identity line, so
distance from the diagonal reads as error; dot plots put every group on one horizontal scale.
Never bar length, area or hue; where colour is used at all it comes from a perceptually uniform
map (viridis / cividis). Files are written atomically, as every figure (figures.save_figure).
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np

from brain_ldm_jax import figures
from brain_ldm_jax.errors import ConfigError, DataError


def scatter_requested_vs_measured(requested: Sequence[float],
                                  measured: Sequence[float],
                                  path: str | os.PathLike,
                                  quantity: str,
                                  unit: str,
                                  title: str | None = None) -> float:
  """Measured vs requested on one common scale with the identity line; returns Pearson r.

  Both axes share limits and aspect so distance from the diagonal reads directly as error.
  r is NaN (and the title says 'r undefined') with fewer than two points or no variance.
  """
  x = np.asarray(requested, np.float64).reshape(-1)
  y = np.asarray(measured, np.float64).reshape(-1)
  if x.size != y.size:
    raise DataError(f"requested has {x.size} values, measured has {y.size}")
  r = pearson_r(x, y)
  plt = figures.pyplot()
  fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=120)
  try:
    finite = np.concatenate([x, y])
    finite = finite[np.isfinite(finite)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    pad = 0.05 * (hi - lo) if hi > lo else 1.0
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], color="0.6", linewidth=1, linestyle="--", label="identity",
            zorder=1)
    ax.scatter(x, y, s=18, color=_cmap_colors(1, "cividis")[0], alpha=0.85, zorder=2,
               edgecolors="none")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel(f"requested {quantity} ({unit})")
    ax.set_ylabel(f"measured {quantity} ({unit})")
    r_text = f"r = {r:.3f}" if math.isfinite(r) else "r undefined"
    ax.set_title(f"{title + ': ' if title else ''}{quantity}, {r_text} (n = {x.size})",
                 fontsize=9)
    ax.grid(True, color="0.92", linewidth=0.6)
    ax.legend(loc="upper left", fontsize=7, frameon=False)
    fig.tight_layout()
    figures.save_figure(fig, path)
  finally:
    plt.close(fig)
  return r


def dot_plot(values_by_group: Mapping[str, Sequence[float] | float],
             path: str | os.PathLike,
             quantity: str = "value",
             unit: str = "",
             title: str | None = None,
             reference: float | None = None,
             show_mean: bool = True) -> None:
  """Cleveland dot plot: one row per group, values as positions on one shared horizontal scale.

  Individual values are small open circles; the group mean is a filled dot. `reference` (e.g. a
  chance level or the real data's value) is drawn as a vertical line.
  """
  if not values_by_group:
    raise DataError("dot_plot: no groups given")
  groups = list(values_by_group)
  plt = figures.pyplot()
  fig, ax = plt.subplots(figsize=(5.0, 0.9 + 0.35 * len(groups)), dpi=120)
  try:
    color = _cmap_colors(1, "viridis")[0]
    for row, group in enumerate(groups):
      vals = np.atleast_1d(np.asarray(values_by_group[group], np.float64))
      y = len(groups) - 1 - row  # first group on top, as in a table
      ax.axhline(y, color="0.92", linewidth=0.6, zorder=0)
      if vals.size > 1:
        ax.scatter(vals, np.full(vals.shape, y), s=16, facecolors="none", edgecolors=color,
                   linewidths=0.8, zorder=2)
      if show_mean or vals.size == 1:
        ax.scatter([np.nanmean(vals)], [y], s=36, color=color, zorder=3)
    if reference is not None:
      ax.axvline(float(reference), color="0.5", linestyle="--", linewidth=1, zorder=1)
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels(list(reversed(groups)))
    ax.set_ylim(-0.6, len(groups) - 0.4)
    ax.set_xlabel(f"{quantity} ({unit})" if unit else quantity)
    if title:
      ax.set_title(title, fontsize=9)
    for side in ("top", "right", "left"):
      ax.spines[side].set_visible(False)
    ax.tick_params(axis="y", length=0)
    fig.tight_layout()
    figures.save_figure(fig, path)
  finally:
    plt.close(fig)


def pearson_r(x: np.ndarray, y: np.ndarray) -> float:
  """Pearson correlation over pairs where both are finite; NaN when undefined."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  ok = np.isfinite(x) & np.isfinite(y)
  x, y = x[ok], y[ok]
  if x.size < 2 or np.std(x) == 0 or np.std(y) == 0:
    return float("nan")
  return float(np.corrcoef(x, y)[0, 1])


def perceptual_colors(n: int, name: str = "viridis") -> list[tuple[float, float, float, float]]:
  """`n` RGBA colours evenly spaced along a perceptually uniform colormap (viridis / cividis)."""
  if name not in ("viridis", "cividis"):
    raise ConfigError(f"colormap {name!r}: use 'viridis' or 'cividis' (perceptually uniform)")
  return _cmap_colors(n, name)


def _cmap_colors(n: int, name: str) -> list[tuple[float, float, float, float]]:
  # matplotlib on first use only: importing it is slow (figures.pyplot).
  from matplotlib import colormaps  # pylint: disable=import-outside-toplevel
  cmap = colormaps[name]
  # Stay off the lightest end, which vanishes on a white background.
  points = [0.15] if n == 1 else np.linspace(0.0, 0.85, n)
  return [tuple(float(c) for c in cmap(p)) for p in points]
