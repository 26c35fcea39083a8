"""Which lowering a CPU convolution takes, and the call into it.

`conv` runs the lowering `impl` names; `impl="auto"` picks one by shape with `choose_impl`, a
static rule over the THRESHOLDS table. Lowerings of a 3D convolution (all exact in exact
arithmetic; all but winograd compute the same sums in another order):
  native      lax.conv_general_dilated in 3D (also every 1D/2D input, and all of GPU/TPU).
  onednn      oneDNN's direct convolution, forward and both gradients (`onednn.conv`).
  depth_sum, depth_fold, im2col, native_im2col, patches   XLA rewrites (`lowerings`).
  winograd    Winograd's F(2,3) over oneDNN's lower-dimensional convolutions (`winograd`).
oneDNN's paths need `ffi.available()`, float32 and the CPU. The rewrites' custom VJPs have no
forward-mode rule (jax.jvp raises); use impl="native" for forward-mode differentiation.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from brain_ldm_jax.cpu import ffi
from brain_ldm_jax.cpu import lowerings
from brain_ldm_jax.cpu import onednn
from brain_ldm_jax.cpu import schedule
from brain_ldm_jax.cpu import winograd
from brain_ldm_jax.cpu.thresholds import THRESHOLDS

IMPLS = ("auto", "native", "onednn", "depth_sum", "depth_fold", "im2col", "native_im2col",
         "patches", "winograd")


def conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
         strides: Sequence[int], padding: Sequence[tuple[int, int]],
         impl: str = "auto") -> jax.Array:
  """N-d convolution (+ bias), channels last: x (B, *spatial, Cin), kernel (*k, Cin, Cout),
  bias (Cout,) or None; the output has x's dtype."""
  if impl not in IMPLS:
    raise ValueError(f"conv impl {impl!r} unknown; choose one of {IMPLS}")
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if impl == "auto":
    impl = choose_impl(x.shape, kernel.shape, strides, schedule.platform(x),
                       onednn=onednn_usable(x, kernel),
                       prepared_kernels=schedule.kernels_invariant())
  if impl == "native" or x.ndim != 5:
    y = lowerings.native(x, kernel, strides, padding)
  elif impl == "onednn":
    return schedule.onednn_conv(x, kernel, strides, padding, bias)
  elif impl == "patches" and onednn_usable(x, kernel):
    return onednn.patches(x, kernel, strides, padding, bias)
  elif impl == "winograd":
    if bias is None:
      bias = jnp.zeros(kernel.shape[-1:], x.dtype)
    return winograd.winograd(x, kernel, bias, strides, padding)
  else:
    y = lowerings.LOWERINGS[impl](x, kernel, strides, padding)
  return y if bias is None else y + bias.astype(y.dtype)


def onednn_usable(x, kernel) -> bool:
  """Whether this convolution may call the oneDNN handlers (CPU, float32, library there)."""
  return (schedule.platform(x) == "cpu" and x.dtype == kernel.dtype == jnp.float32
          and ffi.available())


def choose_impl(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
                platform: str, *, onednn: bool = False, prepared_kernels: bool = False) -> str:
  """The lowering `auto` uses: a static rule over the THRESHOLDS table.

  `onednn`: whether the oneDNN custom call may be used (CPU, float32, library available).
  `prepared_kernels`: whether oneDNN's kernels are prepared once (`invariant_kernels`).
  """
  # The XLA rewrites win at stride 2 as well: the native strided gradients are slow.
  if platform != "cpu" or len(x_shape) != 5:
    return "native"
  voxels = np.prod(x_shape[:4])
  t = THRESHOLDS
  min_ratio = (t["patches_min_kernel_per_voxel_reordered"] if onednn and not prepared_kernels
               else t["patches_min_kernel_per_voxel"])
  if np.prod(kernel_shape[:3]) * kernel_shape[-1] >= min_ratio * voxels:
    return "patches"
  if onednn:
    if (tuple(kernel_shape[:3]) == (3, 3, 3) and all(s == 1 for s in strides)
        and min(kernel_shape[3:]) >= t["winograd_min_channels"]
        and x_shape[2] * x_shape[3] >= t["winograd_min_plane"]
        and voxels * x_shape[4] <= t["winograd_max_elements"]):
      return "winograd"
    return "onednn"
  if all(k == 1 for k in kernel_shape[:3]) or voxels <= t["tiny_max_voxels"]:
    return "native_im2col"
  if kernel_shape[3] <= t["im2col_max_cin"]:
    return "im2col"
  if kernel_shape[3] <= t["fold_max_cin"]:
    return "depth_fold"
  return "depth_sum"
