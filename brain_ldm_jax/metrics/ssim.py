"""SSIM and MS-SSIM for 2D and 3D images, with MONAI's definitions and defaults, plus diversity.

Definitions follow `monai.metrics.regression` (`SSIMMetric`, `MultiScaleSSIMMetric`, MONAI 1.6):

- Gaussian window, size 11, sigma 1.5 per axis (taps exp(-(d/sigma)^2 / 2), normalised), applied
  as a *valid* filter (no padding); `k1 = 0.01`, `k2 = 0.03`, `c1 = (k1 L)^2`, `c2 = (k2 L)^2`,
  `L = data_range`. Local moments are the filtered x, y, x^2, y^2, xy, and
  `cs = (2 s_xy + c2) / (s_x + s_y + c2)`, `ssim = (2 m_x m_y + c1) / (m_x^2 + m_y^2 + c1) * cs`.
- SSIM of an image pair = mean of the SSIM map over all channels and positions.
- MS-SSIM with weights w_1..w_n (default (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)): at scales
  1..n-1 the mean cs, at scale n the mean SSIM, each clipped at 0 (relu), combined as
  prod_i v_i^w_i; between scales both images are average-pooled 2x (floor, odd edges dropped).

Differences from MONAI, none of which changes a value MONAI defines:
- Layout is channels last, (B, *spatial, C) or (B, *spatial); results are per pair, shape (B,).
- The Gaussian is applied separably (exact up to float rounding: MONAI's kernel is the outer
  product of the 1D taps), which is what makes 3D fast.
- Size check: MONAI requires `dim // (n-1)^2 > win - 1` per axis; that equals the exact
  condition (the coarsest scale `dim // 2^(n-1)` is at least `win`) for 3 and 5 weights but not
  for 2 or 4. We check the exact condition, so some sizes MONAI refuses are accepted here (and
  then agree with what MONAI's computation would give).

`pairwise_diversity` averages any such pair metric over random distinct pairs of one set, the
diversity statistic of Pinaya et al. 2022 (1000 pairs; closer to the real-data value is better).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools

import jax
import jax.numpy as jnp
import numpy as np

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def gaussian_taps(win_size: int, sigma: float) -> np.ndarray:
  """MONAI's 1D Gaussian window: taps at (1-win)/2 .. (win-1)/2, normalised to sum 1."""
  dist = np.arange((1 - win_size) / 2, (1 + win_size) / 2, 1.0)
  g = np.exp(-((dist / sigma) ** 2) / 2)
  return (g / g.sum()).astype(np.float32)


def _as_tuple(v, n):
  return tuple(v) if isinstance(v, Sequence) else (v,) * n


def _with_channels(x: jax.Array, spatial_dims: int) -> jax.Array:
  """(B, *spatial) -> (B, *spatial, 1); (B, *spatial, C) unchanged."""
  if x.ndim == spatial_dims + 1:
    return x[..., None]
  if x.ndim == spatial_dims + 2:
    return x
  raise ValueError(f"expected (B, *spatial[{spatial_dims}], C) or (B, *spatial); got shape {x.shape}")


def filter_valid(x: jax.Array, taps: Sequence[np.ndarray], axes: Sequence[int]) -> jax.Array:
  """Separable valid correlation: along each axis, sum_k taps[k] * x[k : k + n - win + 1].

  A sum of shifted slices fuses into one XLA loop per axis, which on CPU beats both a 1D
  convolution (poorly vectorised for one channel) and a banded-matrix product (15x the flops).
  """
  for ax, t in zip(axes, taps):
    n_out = x.shape[ax] - len(t) + 1
    acc = None
    for k, w in enumerate(np.asarray(t, np.float32)):
      term = float(w) * jax.lax.slice_in_dim(x, k, k + n_out, axis=ax)
      acc = term if acc is None else acc + term
    x = acc
  return x


def ssim_and_cs_maps(x: jax.Array, y: jax.Array, *, spatial_dims: int, data_range: float = 1.0,
                     win_size: int | Sequence[int] = 11, sigma: float | Sequence[float] = 1.5,
                     k1: float = 0.01, k2: float = 0.03) -> tuple[jax.Array, jax.Array]:
  """SSIM and cs maps on the valid grid, channels last: (B, *spatial_valid, C) each."""
  x = _with_channels(jnp.asarray(x, jnp.float32), spatial_dims)
  y = _with_channels(jnp.asarray(y, jnp.float32), spatial_dims)
  if x.shape != y.shape:
    raise ValueError(f"x and y should have the same shape, got {x.shape} and {y.shape}")
  wins = _as_tuple(win_size, spatial_dims)
  sigmas = _as_tuple(sigma, spatial_dims)
  for n, w in zip(x.shape[1:-1], wins):
    if n < w:
      raise ValueError(f"spatial size {x.shape[1:-1]} is smaller than the SSIM window {wins}")
  taps = [gaussian_taps(w, s) for w, s in zip(wins, sigmas)]
  # One filtering pass over the five moment images stacked on a leading axis.
  stack = jnp.stack([x, y, x * x, y * y, x * y])
  mu_x, mu_y, mu_xx, mu_yy, mu_xy = filter_valid(stack, taps, range(2, 2 + spatial_dims))
  c1 = (k1 * data_range) ** 2
  c2 = (k2 * data_range) ** 2
  sigma_x = mu_xx - mu_x * mu_x
  sigma_y = mu_yy - mu_y * mu_y
  sigma_xy = mu_xy - mu_x * mu_y
  cs = (2 * sigma_xy + c2) / (sigma_x + sigma_y + c2)
  ssim_map = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1) * cs
  return ssim_map, cs


def _mean_per_pair(m: jax.Array) -> jax.Array:
  return m.reshape(m.shape[0], -1).mean(axis=1)


@functools.partial(jax.jit, static_argnames=("spatial_dims", "data_range", "win_size", "sigma",
                                             "k1", "k2"))
def ssim(x: jax.Array, y: jax.Array, *, spatial_dims: int, data_range: float = 1.0,
         win_size: int | tuple[int, ...] = 11, sigma: float | tuple[float, ...] = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> jax.Array:
  """SSIM per pair, shape (B,): MONAI `SSIMMetric` (mean over channels and positions)."""
  ssim_map, _ = ssim_and_cs_maps(x, y, spatial_dims=spatial_dims, data_range=data_range,
                                 win_size=win_size, sigma=sigma, k1=k1, k2=k2)
  return _mean_per_pair(ssim_map)


def avg_pool2(x: jax.Array, spatial_dims: int) -> jax.Array:
  """2x average pooling of (B, *spatial, C), floor semantics like torch's avg_pool (k=2)."""
  b, c = x.shape[0], x.shape[-1]
  sp = [n // 2 for n in x.shape[1:-1]]
  x = x[(slice(None), *(slice(0, 2 * n) for n in sp), slice(None))]
  x = x.reshape(b, *[v for n in sp for v in (n, 2)], c)
  return x.mean(axis=tuple(2 + 2 * i for i in range(spatial_dims)))


def max_ms_ssim_scales(spatial_shape: Sequence[int], win_size: int | Sequence[int] = 11) -> int:
  """Largest number of scales whose coarsest image still holds a full window on every axis."""
  wins = _as_tuple(win_size, len(spatial_shape))
  n = 0
  while all(s // 2 ** n >= w for s, w in zip(spatial_shape, wins)):
    n += 1
  return n


def check_ms_ssim_size(spatial_shape: Sequence[int], num_scales: int,
                       win_size: int | Sequence[int] = 11) -> None:
  """Raise a ValueError naming the sizes when `num_scales` scales do not fit."""
  most = max_ms_ssim_scales(spatial_shape, win_size)
  if num_scales > most:
    raise ValueError(
        f"MS-SSIM with {num_scales} scales and window {win_size} needs every spatial size "
        f">= window * 2^{num_scales - 1}; got {tuple(spatial_shape)}, which allows at most "
        f"{most} scale(s). Pass fewer `weights` or a smaller `win_size`.")


@functools.partial(jax.jit, static_argnames=("spatial_dims", "data_range", "win_size", "sigma",
                                             "k1", "k2", "weights"))
def ms_ssim(x: jax.Array, y: jax.Array, *, spatial_dims: int, data_range: float = 1.0,
            win_size: int | tuple[int, ...] = 11, sigma: float | tuple[float, ...] = 1.5,
            k1: float = 0.01, k2: float = 0.03,
            weights: tuple[float, ...] = MS_SSIM_WEIGHTS) -> jax.Array:
  """MS-SSIM per pair, shape (B,): MONAI `MultiScaleSSIMMetric` (one scale per weight)."""
  x = _with_channels(jnp.asarray(x, jnp.float32), spatial_dims)
  y = _with_channels(jnp.asarray(y, jnp.float32), spatial_dims)
  weights = tuple(weights)
  check_ms_ssim_size(x.shape[1:-1], len(weights), win_size)
  values = []
  for i in range(len(weights)):
    ssim_map, cs = ssim_and_cs_maps(x, y, spatial_dims=spatial_dims, data_range=data_range,
                                    win_size=win_size, sigma=sigma, k1=k1, k2=k2)
    if i < len(weights) - 1:
      values.append(jax.nn.relu(_mean_per_pair(cs)))
      x, y = avg_pool2(x, spatial_dims), avg_pool2(y, spatial_dims)
    else:
      values.append(jax.nn.relu(_mean_per_pair(ssim_map)))
  v = jnp.stack(values)  # (scales, B)
  return jnp.prod(v ** jnp.asarray(weights, jnp.float32)[:, None], axis=0)


def ms_ssim_weights_for(spatial_shape: Sequence[int], win_size: int | Sequence[int] = 11,
                        weights: Sequence[float] = MS_SSIM_WEIGHTS) -> tuple[float, ...]:
  """The first k standard weights, renormalised to sum 1, for the largest k that fits.

  Used where an image is too small for all five scales (e.g. 40x56x40 allows two; 160x224x160
  allows four with an 11-voxel window). Renormalising keeps the result a weighted geometric mean.
  """
  k = min(len(weights), max_ms_ssim_scales(spatial_shape, win_size))
  if k < 1:
    raise ValueError(f"spatial size {tuple(spatial_shape)} is smaller than the window {win_size}")
  w = np.asarray(weights[:k], np.float64)
  return tuple(float(v) for v in w / w.sum())


def sample_pairs(key: jax.Array, num_items: int, num_pairs: int) -> np.ndarray:
  """`num_pairs` distinct unordered pairs (i < j) of `range(num_items)`, as an (M, 2) array.

  Sampled without replacement from all n(n-1)/2 pairs, so no pair is scored twice and no
  volume is compared with itself.
  """
  total = num_items * (num_items - 1) // 2
  if num_items < 2 or num_pairs < 1:
    raise ValueError(f"need >= 2 volumes and >= 1 pair; got {num_items} volumes, {num_pairs} pairs")
  if num_pairs > total:
    raise ValueError(f"{num_pairs} distinct pairs requested but {num_items} volumes only have {total}")
  lin = np.asarray(jax.random.choice(key, total, (num_pairs,), replace=False), np.int64)
  # Invert lin = i*n - i*(i+1)/2 + (j - i - 1) for the row i, then the column j.
  n = num_items
  i = np.floor((2 * n - 1 - np.sqrt((2 * n - 1) ** 2 - 8 * lin)) / 2).astype(np.int64)
  start = i * n - i * (i + 1) // 2
  # Guard against float rounding at row boundaries.
  i = np.where(lin < start, i - 1, i)
  start = i * n - i * (i + 1) // 2
  nxt = (i + 1) * n - (i + 1) * (i + 2) // 2
  i = np.where(lin >= nxt, i + 1, i)
  start = i * n - i * (i + 1) // 2
  j = lin - start + i + 1
  return np.stack([i, j], axis=1)


def pairwise_scores(volumes, pairs: np.ndarray, metric: Callable[[jax.Array, jax.Array], jax.Array],
                    batch_size: int = 8) -> np.ndarray:
  """metric(volumes[i], volumes[j]) for each row of `pairs`, in fixed-size jitted batches.

  `volumes` is anything indexable by an integer array (numpy array on host, jax array); only
  one batch of volumes is on the device at a time. The last batch is padded by repetition so
  the metric compiles once.
  """
  fn = jax.jit(metric)
  pairs = np.asarray(pairs)
  out = []
  for s in range(0, len(pairs), batch_size):
    chunk = pairs[s:s + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
    a = jnp.asarray(np.stack([np.asarray(volumes[int(k)]) for k in chunk[:, 0]]))
    b = jnp.asarray(np.stack([np.asarray(volumes[int(k)]) for k in chunk[:, 1]]))
    out.append(np.asarray(fn(a, b))[:n])
  return np.concatenate(out)


def pairwise_diversity(volumes, key: jax.Array, num_pairs: int,
                       metric: Callable[[jax.Array, jax.Array], jax.Array],
                       batch_size: int = 8) -> float:
  """Mean of `metric` over `num_pairs` random distinct pairs of `volumes` (N, *spatial[, C]).

  `metric(a, b)` maps two batches to per-pair scores (B,), e.g.
  `functools.partial(ms_ssim, spatial_dims=3)`. Works the same for generated and real sets.
  """
  pairs = sample_pairs(key, len(volumes), num_pairs)
  return float(np.mean(pairwise_scores(volumes, pairs, metric, batch_size)))


def default_ms_ssim(spatial_shape: Sequence[int], win_size: int = 11) -> Callable:
  """MS-SSIM for volumes of `spatial_shape` with as many standard scales as fit (see above)."""
  w = ms_ssim_weights_for(spatial_shape, win_size)
  return functools.partial(ms_ssim, spatial_dims=len(spatial_shape), win_size=win_size, weights=w)


__all__ = [
    "MS_SSIM_WEIGHTS", "avg_pool2", "check_ms_ssim_size", "default_ms_ssim", "filter_valid",
    "gaussian_taps", "max_ms_ssim_scales", "ms_ssim", "ms_ssim_weights_for", "pairwise_diversity",
    "pairwise_scores", "sample_pairs", "ssim", "ssim_and_cs_maps",
]
