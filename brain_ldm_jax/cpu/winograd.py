"""Winograd's F(2,3) convolution (Lavin & Gray 2016) over oneDNN's convolutions.

Along depth and height: each 2x2 block of output rows from 16 width convolutions of transformed
input rows instead of 36, 4/9 of the multiply-adds (along depth alone, with 2D convolutions: 4
instead of 6, 2/3). The gradients are those of the depth-only form. Its float32 rounding differs
from the direct sums no more than oneDNN's does from XLA's. CPU with oneDNN; kernel size 3 and
stride 1 along depth (and height, for the two-axis form).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from brain_ldm_jax.cpu import schedule
from brain_ldm_jax.cpu.thresholds import THRESHOLDS

# Winograd's F(2,3): input slices d0..d3 -> B^T d, the depth taps w0..w2 -> G w, and the 4 products
# back to 2 output slices with A^T (Lavin & Gray 2016).
_WINOGRAD_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINOGRAD_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_WINOGRAD_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


def _combine(parts, coefficients):
  """sum(c * p) over the nonzero coefficients, without multiplying by +-1."""
  out = None
  for c, p in zip(coefficients, parts):
    if c == 0:
      continue
    term = p if c == 1 else -p if c == -1 else c * p
    out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def winograd(x, kernel, bias, strides, padding):
  """conv(x, kernel) + bias by F(2,3) along depth (and height, on large planes)."""
  along_height = kernel.shape[1] == 3 and strides[1] == 1
  plane = x.shape[2] * x.shape[3]
  n_axes = 2 if along_height and plane >= THRESHOLDS["winograd_dh_min_plane"] else 1
  return _winograd_along(x, kernel, bias, strides, padding, n_axes)


def _winograd_fwd(x, kernel, bias, strides, padding):
  return winograd(x, kernel, bias, strides, padding), (x, kernel)


def _winograd_bwd(strides, padding, res, ct):
  # Along depth only: its gradients (2D convolutions) beat those of depth and height (1D ones).
  # Linear in x and in (kernel, bias) apart: the vjp needs no forward values.
  x, kernel = res
  bias = jnp.zeros(kernel.shape[-1:], kernel.dtype)
  _, vjp = jax.vjp(lambda *a: _winograd_along(*a, strides, padding, 1), x, kernel, bias)
  return vjp(ct)


winograd.defvjp(_winograd_fwd, _winograd_bwd)


def _winograd_along(x, kernel, bias, strides, padding, n_axes):
  """F(2,3) Winograd along the first `n_axes` spatial axes; oneDNN convolutions over the rest."""
  if tuple(kernel.shape[:n_axes]) != (3,) * n_axes or any(s != 1 for s in strides[:n_axes]):
    raise ValueError(f"conv impl 'winograd' needs kernel size 3 and stride 1 along depth, got "
                     f"kernel {kernel.shape} and strides {tuple(strides)}")
  b, cout = x.shape[0], kernel.shape[-1]
  tiles, out_len, pads = [], [], [(0, 0)]
  for a in range(n_axes):
    (lo, hi), n = padding[a], x.shape[1 + a]
    out_len.append(n + lo + hi - 2)
    tiles.append(-(-out_len[-1] // 2))
    # Tile i reads padded slices 2i..2i+3; the last tile may run one slice past the output.
    pads.append((lo, 2 * tiles[-1] + 2 - n - lo))
  # x in memory first: fused into the transforms, its producer (a GroupNorm) would run 4^n times.
  x = schedule.in_memory(x)
  u = {(): jnp.pad(x, pads + [(0, 0)] * (x.ndim - 1 - n_axes))}
  # The kernel's transform tied to x, like upsample2_conv's parity kernels.
  g = {(): schedule.kernel_to_prepare(kernel, x)}
  for a in range(n_axes):
    u = {idx + (i,): _combine(slices, bt) for idx, v in u.items()
         for slices in [[lax.slice_in_dim(v, k, k + 2 * tiles[a] - 1, 2, axis=1 + a)
                         for k in range(4)]]
         for i, bt in enumerate(_WINOGRAD_BT)}
    g = {idx + (i,): _combine([w[z] for z in range(3)], row) for idx, w in g.items()
         for i, row in enumerate(_WINOGRAD_G)}
  m = {}
  for idx, v in u.items():
    folded = v.reshape(b * int(np.prod(tiles)), *v.shape[1 + n_axes:])
    # Every output sums product (1, ..., 1) exactly once (A^T's column 1 is all ones): it carries
    # the bias.
    y = schedule.onednn_conv(folded, g[idx], strides[n_axes:], padding[n_axes:],
                             bias if all(i == 1 for i in idx) else None)
    m[idx] = y.reshape(b, *tiles, *y.shape[1:])
  # Back from transform indices to output parities, one axis at a time.
  for a in range(n_axes):
    m = {key[:a] + (p,) + key[a + 1:]: _combine([m[key[:a] + (i,) + key[a + 1:]] for i in range(4)],
                                                at)
         for key in m if key[a] == 0 for p, at in enumerate(_WINOGRAD_AT)}
  parities = list(np.ndindex(*(2,) * n_axes))
  y = jnp.stack([m[p] for p in parities], axis=1 + n_axes)
  y = y.reshape(b, *tiles, *(2,) * n_axes, *y.shape[2 + n_axes:])
  # (b, t1.., p1.., rest, C) -> (b, t1, p1, t2, p2, .., rest, C): the parities interleave.
  order = [0] + [ax for a in range(n_axes) for ax in (1 + a, 1 + n_axes + a)]
  y = y.transpose(*order, *range(1 + 2 * n_axes, y.ndim))
  y = y.reshape(b, *(2 * t for t in tiles), *y.shape[1 + 2 * n_axes:])
  return y[(slice(None), *(slice(0, n) for n in out_len))]
