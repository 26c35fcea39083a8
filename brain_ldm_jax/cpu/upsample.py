"""The ×2 nearest upsampling followed by a 3^d convolution (MONAI's Upsample -> conv) on CPU.

Without building the 2^d times larger upsampled input where it can: as oneDNN's per-tap products
(`onednn.upsample2_conv`) or as 8 sub-pixel parity convolutions of the input itself; elsewhere
the upsampled input is built but only the input kept for the backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from brain_ldm_jax.cpu import dispatch
from brain_ldm_jax.cpu import lowerings
from brain_ldm_jax.cpu import onednn
from brain_ldm_jax.cpu import schedule
from brain_ldm_jax.cpu.thresholds import THRESHOLDS

def upsample_nearest2(x: jax.Array) -> jax.Array:
  """Nearest-neighbour ×2 upsampling over all spatial axes (torch interpolate, scale 2)."""
  for axis in range(1, x.ndim - 1):
    x = jnp.repeat(x, 2, axis=axis)
  return x


# Output 2i of a 3-tap conv over the nearest-upsampled input reads up[2i-1], up[2i], up[2i+1] =
# x[i-1], x[i], x[i]; output 2i+1 reads x[i], x[i], x[i+1]. So along each axis an even output is a
# 2-tap conv of x over offsets (-1, 0) with taps (w0, w1 + w2), an odd one over (0, +1) with
# (w0 + w1, w2).
_PHASE_PADDING = ((1, 0), (0, 1))
# The same as a 0/1 matrix: tap t (of 2^3) of parity p's kernel sums the 3^3 kernel's taps k with
# _PHASE_TAPS[p, t, k] = 1, parities and taps in np.ndindex(2, 2, 2) order.
_PHASE_TAPS_1D = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)
_PHASE_TAPS = np.einsum("aAi,bBj,cCk->abcABCijk", *(_PHASE_TAPS_1D,) * 3).reshape(8, 8, 27)


def _phase_kernel(kernel, parities):
  for axis, parity in enumerate(parities):
    w0, w1, w2 = (lax.index_in_dim(kernel, i, axis) for i in range(3))
    pair = (w0, w1 + w2) if parity == 0 else (w0 + w1, w2)
    kernel = jnp.concatenate(pair, axis=axis)
  return kernel


@jax.custom_vjp
def _phase_kernels(kernel):
  """The 8 parity kernels (2, 2, 2, Cin, Cout), in np.ndindex(2, 2, 2) order. Their gradient is
  one matmul of the stacked cotangents with _PHASE_TAPS: XLA's transpose of the slices and sums
  above took longer than the 8 convolutions' own gradients."""
  return tuple(_phase_kernel(kernel, parities) for parities in np.ndindex(2, 2, 2))


def _phase_kernels_fwd(kernel):
  return _phase_kernels(kernel), None


def _phase_kernels_bwd(_, cts):
  taps = jnp.asarray(_PHASE_TAPS.reshape(64, 27).T, cts[0].dtype)
  grad = lowerings.matmul(taps, jnp.stack(cts).reshape(64, -1))
  return (grad.reshape(3, 3, 3, *cts[0].shape[3:]),)


_phase_kernels.defvjp(_phase_kernels_fwd, _phase_kernels_bwd)


def upsample2_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
                   padding: Sequence[tuple[int, int]], impl: str = "auto") -> jax.Array:
  """conv(upsample_nearest2(x), kernel, bias), stride 1: MONAI's Upsample(nearest) -> 3^d conv.

  With a 3^3 kernel and padding 1 on CPU this never builds the upsampled input. From
  THRESHOLDS["tap_products_min_channels"] with oneDNN (impl "auto"), `onednn.upsample2_conv`
  multiplies each input voxel by each tap and sums the products into the outputs. Otherwise, for
  an input of at least THRESHOLDS["subpixel_min_voxels"] voxels, each of the 8 output parities
  (even/odd along each axis) is a 2^3 convolution of x itself with the kernel's taps summed
  where they read the same input voxel (sub-pixel convolution). That is 64 instead of
  216 multiply-adds per input voxel and channel pair, and neither the 8x larger upsampled input
  nor its gradient is kept. Exact up to float32 rounding (the tap sums). The 8 outputs are then
  interleaved into the full-resolution result.

  Elsewhere (GPU/TPU, small inputs) the upsampled input is built, but only x is kept for the
  backward pass, which upsamples again (`_upsample_then_conv`); impl="native" is plain autodiff.
  """
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  nd = x.ndim - 2
  taps3 = nd == 3 and kernel.shape[:3] == (3, 3, 3) and padding == ((1, 1),) * 3
  if (taps3 and impl == "auto" and dispatch.onednn_usable(x, kernel)
      and min(kernel.shape[-2:]) >= THRESHOLDS["tap_products_min_channels"]):
    return onednn.upsample2_conv(x, kernel, bias)
  subpixel = (taps3 and schedule.platform(x) == "cpu"
              and np.prod(x.shape[:4]) >= THRESHOLDS["subpixel_min_voxels"])
  if not subpixel:
    if impl == "native":  # plain autodiff, forward mode included
      return dispatch.conv(upsample_nearest2(x), kernel, bias, strides=(1,) * nd, padding=padding,
                  impl=impl)
    return _upsample_then_conv(x, kernel, bias, padding, impl)
  b, d, h, w, _ = x.shape
  # Made from the parameters alone, the parity kernels (64/27 of the kernel) would be computed at
  # the program's start and held until here (paper UNet forward at 12×16×12: 226 of XLA's 312 MB
  # of temp buffers); tied to x they are made when needed.
  kernel = schedule.kernel_to_prepare(kernel, x)
  phases = [dispatch.conv(x, phase_kernel, bias, strides=(1, 1, 1),
                 padding=tuple(_PHASE_PADDING[p] for p in parities), impl=impl)
            for phase_kernel, parities in zip(_phase_kernels(kernel), np.ndindex(2, 2, 2))]
  y = jnp.stack(phases, axis=-2).reshape(b, d, h, w, 2, 2, 2, -1)
  y = y.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, 2 * d, 2 * h, 2 * w, -1)
  # The backward pass slices the cotangent 8 ways; computed in place of each slice, its producer
  # (e.g. a GroupNorm backward) would keep all of its inputs alive until the last.
  return schedule.cotangent_in_memory(y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _upsample_then_conv(x, kernel, bias, padding, impl):
  """conv(upsample_nearest2(x)), keeping x, not the 2^d times larger upsampled input, for the
  backward pass, which upsamples again once the cotangent exists: kept, the upsampled input of the
  paper autoencoder's last upsampling lived through the next block's backward pass (on GPU the
  train step's memory peak)."""
  nd = x.ndim - 2
  return dispatch.conv(upsample_nearest2(x), kernel, bias, strides=(1,) * nd, padding=padding,
                       impl=impl)


def _upsample_then_conv_fwd(x, kernel, bias, padding, impl):
  return _upsample_then_conv(x, kernel, bias, padding, impl), (x, kernel, bias)


def _upsample_then_conv_bwd(padding, impl, residuals, ct):
  x, kernel, bias = residuals
  x = schedule.after(x, ct)
  nd = x.ndim - 2
  _, vjp = jax.vjp(lambda x, k, b: dispatch.conv(upsample_nearest2(x), k, b, strides=(1,) * nd,
                                        padding=padding, impl=impl), x, kernel, bias)
  return vjp(ct)


_upsample_then_conv.defvjp(_upsample_then_conv_fwd, _upsample_then_conv_bwd)
