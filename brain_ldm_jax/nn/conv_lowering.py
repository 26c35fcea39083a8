"""How a convolution becomes XLA operations: the one swappable place for conv lowering.

Every convolution in the networks goes through `conv`. On GPU/TPU the native convolution is the
fast path (cuDNN / the TPU convolution unit). On CPU, XLA's native 3D convolution is 2-10x slower
than PyTorch's (benchmarks/benchmark.md): `impl="auto"` uses oneDNN's convolutions through an
XLA custom call (`onednn.py`) where that is available, and exact rewrites into XLA operations
where it is not.
`choose_impl` holds the rule.

Lowerings of a 3D convolution (all exact in exact arithmetic; all but winograd compute the same
sums in another order):
  native      lax.conv_general_dilated in 3D.
  onednn      oneDNN's direct convolution, forward and both gradients, as an XLA FFI custom call
              (CPU, float32). 1-2x torch's speed and 2-100x native's, at every shape the networks use
              except the tiny volumes below.
  depth_sum   sum over the kd depth taps of 2D convs on shifted depth slices (depth folded into
              batch). Custom VJP: the input grad is the autodiff of this lowering; the kernel grad is
              the per-tap 2D kernel grads summed over output-depth chunks (XLA:CPU's kernel-grad
              conv is several times slower when its contraction runs over a whole 40x56x40 volume),
              read from a channels-major copy of the input made once in the forward pass.
  depth_fold  the kd depth taps folded into channels: one 2D conv with kd*Cin input channels. Custom
              VJP with chunked kernel grads of the lowering itself. Best where Cin is small (the
              latent input).
  im2col      all taps folded into channels: one matmul (out_voxels, k^3*Cin) @ (k^3*Cin, Cout).
              XLA:CPU's 27-way concatenation is slow, so this pays only for 1^3 kernels (a plain
              matmul, no concatenation) and for Cin = 1 (the first layer).
  native_im2col  the native conv forward with im2col's matmul gradients. For 1^3 kernels without
              oneDNN (XLA:CPU runs a 1^3 conv 1.2-1.6x faster than the equivalent matmul, and its
              gradients 2-3x slower).
  patches     every tap's input slice stacked in the kernel's own order: one matmul with the
              kernel as stored (no reorder, no copy), and two for the gradients. For tiny volumes
              such as the paper UNet's 3x4x3 level, where 64 MB of weights meet 36 voxels. With
              oneDNN, `onednn.patches`: the slices gathered and sgemm called in one custom call
              per pass; else the slices in XLA and `matmul`.
  winograd    Winograd's F(2,3) (Lavin & Gray 2016) along depth and height, oneDNN's 1D
              convolutions along width: each 2x2 block of output rows from 16 width convolutions
              of transformed input rows instead of 36, 4/9 of the multiply-adds (along depth
              alone, with 2D convolutions, on planes under 192 voxels: 4 instead of 6, 2/3). The
              gradients are those of the depth-only form. Its float32 rounding differs from the
              direct sums no more than oneDNN's does from XLA's (max error / max |y| 1-4e-6 vs
              3e-6, float64 reference). CPU with oneDNN; kernel size 3 and stride 1 along depth
              (and height, for the two-axis form).
2D (or 1D) inputs always use the native convolution.

The rewrites' custom VJP has no forward-mode rule (jax.jvp / jacfwd raise); use impl="native" for
forward-mode differentiation.

Kernel preparation (Winograd's and sub-pixel upsampling's transformed kernels, oneDNN's reorder of
a kernel into its own layout) is tied to the convolution's input by default, so that one forward
pass or train step makes each prepared kernel when it is needed and holds few at a time. Inside
`invariant_kernels()` it depends on the kernel alone, for loops over fixed parameters (samplers).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import contextvars
from typing import Any
import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from brain_ldm_jax.nn import onednn

IMPLS = ("auto", "native", "onednn", "depth_sum", "depth_fold", "im2col", "native_im2col",
         "patches", "winograd")

# `choose_impl` thresholds, from scripts/benchmark_conv.py on a 2-core Zen 4 (AVX-512). Without
# oneDNN: at small Cin the 2D convs of depth_sum have too little work per GEMM; folding the depth taps into
# channels gives them 3x more (fwd+bwd vs native: 7->32 at 20x28x20 10x vs 7x). Since depth_sum's
# kernel gradient reads a channels-major copy of its input, it wins from 16 channels on (demo AE
# train step 1.82 -> 1.54 s with 16-channel convs moved from depth_fold to depth_sum).
_FOLD_MAX_CIN = 8
# At Cin = 1 even all 27 taps make only 27 channels: one matmul beats both (fwd+bwd 14x vs 11x).
_IM2COL_MAX_CIN = 1
# Weight-bound convolutions (kernel taps * Cout at least this many times the input voxels, batch
# included) use `patches`, which reads the kernel once as stored: at 3x4x3, 768 -> 768 channels
# (ratio 576) fwd+bwd 44 ms vs onednn 115 ms (it reorders the 64 MB kernel each pass),
# native_im2col 79 ms, torch 51 ms; at 5x7x5, 768 (ratio 118) fwd / fwd+bwd 34 / 109 ms vs onednn
# 45 / 153. At 5x7x5, 512 (79) and 6x8x6, 768 (72) they tie; at 6x8x6, 512 (48) onednn is ahead.
_PATCHES_MIN_KERNEL_PER_VOXEL = 100
# With oneDNN, from this ratio on: its `patches` handler (taps gathered in the call) against a
# oneDNN convolution that reorders its kernel in every call. The 12x16x12 paper-width UNet
# forward, whose 6x8x6 convolutions (ratio 48-72) switch, in one process against 100 (s, 4 runs
# on the 2-core Xeon): 1.064 vs 1.172, 1.212 vs 1.233, 1.206 vs 1.222, 1.229 vs 1.298. Inside
# `invariant_kernels` oneDNN reorders each kernel once and the threshold stays at 100: a scanned
# step of that UNet took 1.170 s at 40 against 1.130 s at 100.
_PATCHES_MIN_KERNEL_PER_VOXEL_REORDERED = 40
# With oneDNN, 3^3 stride-1 convolutions with at least this many input and output channels and
# in-plane voxels use winograd (fwd / fwd+bwd vs onednn, ms; depth-only form on planes under 192):
# 20x28x20, 256 -> 256: 108 / 239 vs 160 / 334; 512 -> 256: 205 / ~510 vs 387 / 672; 12x16x12,
# 256: 24 / ~52 vs 33 / 69; 10x14x10, 512: 77 / 179 vs 84 / 182; 40x56x40, 128: 264 / 633 vs
# 340 / 729. It loses on small planes (6x8x6, 512: 46 / 88 vs 21 / 42), below 64 input channels
# and in training at few output channels (10x14x10 batch 6, 96 -> 32: 5.4 / 20.3 vs 5.7 / 16.5).
_WINOGRAD_MIN_CHANNELS = 64
_WINOGRAD_MIN_PLANE = 128
# ... and inputs of at most this many elements: the backward pass builds the transformed input
# (twice the input), which the paper-size autoencoder's 12 GiB cannot take at full resolution.
_WINOGRAD_MAX_ELEMENTS = 1 << 24
# Its forward pass runs along depth and height from this many in-plane voxels (12x16x12, 256:
# 24 vs 27 ms; 10x14x10, 512: 81 vs 77).
_WINOGRAD_DH_MIN_PLANE = 192
# Without oneDNN, at most this many input voxels use native_im2col (at 3x4x3, 768 channels, the
# native forward is 2.7x faster than depth_sum's three 2D convs).
_TINY_MAX_VOXELS = 128

# Matmuls with kernels of at least this many elements (1 MiB) use oneDNN's sgemm. XLA's own
# matmul took 1.5-3x its time at the paper-width UNet's few-row products (2-core Xeon, 20 kernels
# in turn, beyond the L3; ms, XLA vs sgemm vs torch): 36 x 768 @ 768 x 6144 (GEGLU at 3x4x3): 8.2
# vs 3.7 vs 2.9; 36 x 3072 @ 3072 x 768: 4.1 vs 1.4 vs 1.3; 288 x 512 @ 512 x 4096: 8.8 vs 5.8
# vs 5.9; 288 x 2048 @ 2048 x 512: 5.0 vs 3.3 vs 2.9; `patches` at 3x4x3, 768: 14.0 vs 8.7 vs
# 8.3. The 12x16x12 paper-width forward: 1.47-1.49 vs 1.58 s. Small kernels (the demo UNet's)
# stay with XLA, which fuses what surrounds them.
_ONEDNN_MATMUL_MIN_KERNEL = 1 << 18

# Kernel-gradient chunks hold about this many input floats (rows * Cin): ~1 MiB, Zen 4's L2.
_DW_CHUNK_FLOATS = 1 << 18
_DW_CHUNK_MIN_ROWS = 2048
_DW_MAX_CHUNKS = 8


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
    impl = choose_impl(x.shape, kernel.shape, strides, platform(x),
                       onednn=_onednn_usable(x, kernel),
                       prepared_kernels=_INVARIANT_KERNELS.get())
  if impl == "native" or x.ndim != 5:
    y = _native(x, kernel, strides, padding)
  elif impl == "onednn":
    return _onednn(x, kernel, strides, padding, bias)
  elif impl == "patches" and _onednn_usable(x, kernel):
    return onednn.patches(x, kernel, strides, padding, bias)
  elif impl == "winograd":
    if bias is None:
      bias = jnp.zeros(kernel.shape[-1:], x.dtype)
    return _winograd(x, kernel, bias, strides, padding)
  else:
    y = _LOWERINGS[impl](x, kernel, strides, padding)
  return y if bias is None else y + bias.astype(y.dtype)


def _onednn_usable(x, kernel) -> bool:
  """Whether this convolution may call the oneDNN handlers (CPU, float32, library there)."""
  return (platform(x) == "cpu" and x.dtype == kernel.dtype == jnp.float32
          and onednn.available())


_INVARIANT_KERNELS = contextvars.ContextVar("invariant_kernels", default=False)


@contextlib.contextmanager
def invariant_kernels() -> Iterator[None]:
  """Convolutions traced inside prepare their kernels from the kernel alone: for the body of a
  loop that applies a network with fixed parameters (a sampler's `lax.scan`).

  XLA then computes each prepared kernel (transforms, oneDNN's layout) once, before the loop,
  instead of at every step: a DDIM step of the paper-width UNet at 12x16x12 took about 10 % less
  time (1.5 % at 20x28x20, where the convolutions dominate), with the same result to the bit.
  The price is that all of them stay in memory through the loop (XLA's temp buffers 0.90
  instead of 0.09 GB at 12x16x12, 1.30 instead of 0.22 GB at 20x28x20, beside 2.2 GB of
  parameters).
  Outside, they are tied to the convolution's input (`after`). It acts when functions are traced,
  on CPU with oneDNN; elsewhere it changes nothing.
  A prepared oneDNN kernel is made for the batch size the program was traced with, so its
  convolution is not split over devices by a batch-sharded `jit`: shard the loop with
  `shard_map` (as `generate` does) instead.
  """
  token = _INVARIANT_KERNELS.set(True)
  try:
    yield
  finally:
    _INVARIANT_KERNELS.reset(token)


def _kernel_to_prepare(kernel, x):
  """`kernel`, to be transformed for a convolution of x: tied to x, or alone inside
  `invariant_kernels` (then XLA hoists the transform out of the loop)."""
  return kernel if _INVARIANT_KERNELS.get() else after(kernel, x)


def _onednn(x, kernel, strides, padding, bias=None):
  return onednn.conv(x, kernel, strides, padding, bias, prepare_kernel=_INVARIANT_KERNELS.get())


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
# Below this many input voxels (batch included) the 8 parity convolutions lose: their kernels
# (64 taps against 27) dominate. With the oneDNN convolutions (fwd / fwd+bwd, ms, sub-pixel vs
# upsample-then-conv): 3x4x3, 768 channels: 113 / 645 vs 64 / 192; 6x8x6, 512: 83 / 451 vs
# 153 / 437; 6x8x6 batch 2, 512: 133 / 559 vs 263 / 827; 5x7x5 batch 6, 64: 3.6 / 13 vs 7.7 / 25.
_SUBPIXEL_MIN_VOXELS = 256
# From this many input and output channels (with oneDNN) the upsampling convolution is each input
# voxel's product with each tap, summed into the outputs (`onednn.upsample2_conv`): 27
# multiply-adds per input voxel and channel pair against the parity kernels' 64, but a products
# buffer 27/8 times the output's size, summed in single-threaded passes over memory. fwd / fwd+bwd
# ms, parity convolutions (or upsample-then-conv below _SUBPIXEL_MIN_VOXELS) vs products:
# 3x4x3, 768: 43 / 89 vs 9 / 20; 6x8x6, 512: 116 / 177 vs 29 / 63; 10x14x10, 512: 238 / 486 vs
# 126 / 245; 20x28x20, 128: 108 / 221 vs 152 / 274; 5x7x5 batch 6, 64: 2.9 / 11 vs 3.5 / 7.3;
# 20x28x20 batch 2, 32: 32 / 46 vs 50 / 99.
_TAP_PRODUCTS_MIN_CHANNELS = 256


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
  above took longer than the 8 convolutions' own gradients (6x8x6, 512 channels: the upsampling
  conv's forward + backward 338 -> 199 ms)."""
  return tuple(_phase_kernel(kernel, parities) for parities in np.ndindex(2, 2, 2))


def _phase_kernels_fwd(kernel):
  return _phase_kernels(kernel), None


def _phase_kernels_bwd(_, cts):
  taps = jnp.asarray(_PHASE_TAPS.reshape(64, 27).T, cts[0].dtype)
  grad = matmul(taps, jnp.stack(cts).reshape(64, -1))
  return (grad.reshape(3, 3, 3, *cts[0].shape[3:]),)


_phase_kernels.defvjp(_phase_kernels_fwd, _phase_kernels_bwd)


def upsample2_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
                   padding: Sequence[tuple[int, int]], impl: str = "auto") -> jax.Array:
  """conv(upsample_nearest2(x), kernel, bias), stride 1: MONAI's Upsample(nearest) -> 3^d conv.

  With a 3^3 kernel and padding 1 on CPU this never builds the upsampled input. From
  _TAP_PRODUCTS_MIN_CHANNELS channels with oneDNN (impl "auto"), `onednn.upsample2_conv` multiplies
  each input voxel by each tap and sums the products into the outputs. Otherwise, for an input
  of at least _SUBPIXEL_MIN_VOXELS, each of the 8
  output parities (even/odd along each axis) is a 2^3 convolution of x itself with the kernel's
  taps summed where they read the same input voxel (sub-pixel convolution). That is 64 instead of
  216 multiply-adds per input voxel and channel pair, and neither the 8x larger upsampled input
  nor its gradient is kept. Exact up to float32 rounding (the tap sums). The 8 outputs are then
  interleaved into the full-resolution result.

  Elsewhere (GPU/TPU, small inputs) the upsampled input is built, but only x is kept for the
  backward pass, which upsamples again (`_upsample_then_conv`); impl="native" is plain autodiff.
  """
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  nd = x.ndim - 2
  taps3 = nd == 3 and kernel.shape[:3] == (3, 3, 3) and padding == ((1, 1),) * 3
  if (taps3 and impl == "auto" and _onednn_usable(x, kernel)
      and min(kernel.shape[-2:]) >= _TAP_PRODUCTS_MIN_CHANNELS):
    return onednn.upsample2_conv(x, kernel, bias)
  subpixel = (taps3 and platform(x) == "cpu" and np.prod(x.shape[:4]) >= _SUBPIXEL_MIN_VOXELS)
  if not subpixel:
    if impl == "native":  # plain autodiff, forward mode included
      return conv(upsample_nearest2(x), kernel, bias, strides=(1,) * nd, padding=padding,
                  impl=impl)
    return _upsample_then_conv(x, kernel, bias, padding, impl)
  b, d, h, w, _ = x.shape
  # Made from the parameters alone, the parity kernels (64/27 of the kernel) would be computed at
  # the program's start and held until here (paper UNet forward at 12×16×12: 226 of XLA's 312 MB
  # of temp buffers); tied to x they are made when needed.
  kernel = _kernel_to_prepare(kernel, x)
  phases = [conv(x, phase_kernel, bias, strides=(1, 1, 1),
                 padding=tuple(_PHASE_PADDING[p] for p in parities), impl=impl)
            for phase_kernel, parities in zip(_phase_kernels(kernel), np.ndindex(2, 2, 2))]
  y = jnp.stack(phases, axis=-2).reshape(b, d, h, w, 2, 2, 2, -1)
  y = y.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, 2 * d, 2 * h, 2 * w, -1)
  # The backward pass slices the cotangent 8 ways; computed in place of each slice, its producer
  # (e.g. a GroupNorm backward) would keep all of its inputs alive until the last.
  return _cotangent_in_memory(y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _upsample_then_conv(x, kernel, bias, padding, impl):
  """conv(upsample_nearest2(x)), keeping x, not the 2^d times larger upsampled input, for the
  backward pass, which upsamples again once the cotangent exists. On GPU the kept upsampled input
  of the paper autoencoder's last upsampling (128 channels at 160x224x160, 2.7 GiB) was alive
  through the next block's backward pass, the train step's memory peak."""
  nd = x.ndim - 2
  return conv(upsample_nearest2(x), kernel, bias, strides=(1,) * nd, padding=padding, impl=impl)


def _upsample_then_conv_fwd(x, kernel, bias, padding, impl):
  return _upsample_then_conv(x, kernel, bias, padding, impl), (x, kernel, bias)


def _upsample_then_conv_bwd(padding, impl, residuals, ct):
  x, kernel, bias = residuals
  x = after(x, ct)
  nd = x.ndim - 2
  _, vjp = jax.vjp(lambda x, k, b: conv(upsample_nearest2(x), k, b, strides=(1,) * nd,
                                        padding=padding, impl=impl), x, kernel, bias)
  return vjp(ct)


_upsample_then_conv.defvjp(_upsample_then_conv_fwd, _upsample_then_conv_bwd)


@jax.custom_vjp
def _cotangent_in_memory(y):
  return y


def _cotangent_in_memory_fwd(y):
  return y, None


def _cotangent_in_memory_bwd(_, ct):
  return (in_memory(ct),)


_cotangent_in_memory.defvjp(_cotangent_in_memory_fwd, _cotangent_in_memory_bwd)


def in_memory(x: jax.Array) -> jax.Array:
  """x computed once, into memory, on CPU where the custom calls are built (`onednn.materialize`);
  x unchanged elsewhere."""
  if platform(x) == "cpu" and onednn.available():
    return onednn.materialize(x)
  return x


def after(tree: Any, ct: Any) -> Any:
  """`tree` plus 0 * (one element of `ct` per example): the same values, computable only once
  `ct` exists. Per example, so that under batch sharding the tie stays on each device.

  Tie small trees (parameters) where you can: a tied activation that a custom call reads is a
  full-size copy. On CPU the element is read by a custom call (`onednn.probe`), so the tie waits
  for `ct` in memory; elsewhere, or without that library, a slice of `ct` that XLA may fuse with
  `ct`'s producer (the order holds, but the producer's inputs may stay alive longer)."""
  leaf = jax.lax.stop_gradient(jax.tree_util.tree_leaves(ct)[0])
  if (platform(leaf) == "cpu" and leaf.dtype in (jnp.float32, jnp.bfloat16)
      and onednn.available()):
    probe = onednn.probe(leaf)
  else:
    probe = leaf.reshape(leaf.shape[0], -1)[:, 0].astype(jnp.float32)
  zero = jnp.zeros((), jnp.float32) * probe  # XLA folds x * 0 only for integers (NaN, inf)

  def tie(a):
    if not jnp.issubdtype(a.dtype, jnp.inexact):
      return a
    z = zero.reshape((-1,) + (1,) * (a.ndim - 1)) if a.ndim and a.shape[0] == zero.shape[0] \
        else zero[0]
    return a + z.astype(a.dtype)

  return jax.tree_util.tree_map(tie, tree)


def choose_impl(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
                platform: str, *, onednn: bool = False, prepared_kernels: bool = False) -> str:
  """The lowering `auto` uses: a static rule from scripts/benchmark_conv.py measurements.

  `onednn`: whether the oneDNN custom call may be used (CPU, float32, library available).
  `prepared_kernels`: whether oneDNN's kernels are prepared once (`invariant_kernels`).
  """
  # The XLA rewrites won at stride 2 as well (fwd+bwd 7-29x native, whose strided grads crawl).
  if platform != "cpu" or len(x_shape) != 5:
    return "native"
  voxels = np.prod(x_shape[:4])
  min_ratio = (_PATCHES_MIN_KERNEL_PER_VOXEL_REORDERED if onednn and not prepared_kernels
               else _PATCHES_MIN_KERNEL_PER_VOXEL)
  if np.prod(kernel_shape[:3]) * kernel_shape[-1] >= min_ratio * voxels:
    return "patches"
  if onednn:
    if (tuple(kernel_shape[:3]) == (3, 3, 3) and all(s == 1 for s in strides)
        and min(kernel_shape[3:]) >= _WINOGRAD_MIN_CHANNELS
        and x_shape[2] * x_shape[3] >= _WINOGRAD_MIN_PLANE
        and voxels * x_shape[4] <= _WINOGRAD_MAX_ELEMENTS):
      return "winograd"
    return "onednn"
  if all(k == 1 for k in kernel_shape[:3]) or voxels <= _TINY_MAX_VOXELS:
    return "native_im2col"
  if kernel_shape[3] <= _IM2COL_MAX_CIN:
    return "im2col"
  if kernel_shape[3] <= _FOLD_MAX_CIN:
    return "depth_fold"
  return "depth_sum"


def platform(x) -> str:
  """The platform jit will run x on: its device's, or the default backend's under tracing."""
  # Under jit x is a tracer with no device; the default backend is where jit will run it.
  if isinstance(x, jax.core.Tracer) or not hasattr(x, "devices"):
    return jax.default_backend()
  return next(iter(x.devices())).platform


def _native(x, kernel, strides, padding):
  nd = x.ndim - 2
  spatial = "".join("DHW"[-nd:]) if nd <= 3 else None
  dn = lax.conv_dimension_numbers(x.shape, kernel.shape,
                                  (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
  return lax.conv_general_dilated(x, kernel, window_strides=tuple(strides),
                                  padding=tuple(tuple(p) for p in padding),
                                  dimension_numbers=dn)


def _fold_taps(x, axis, k, stride, pad):
  """Concatenates the k shifted, strided views of x along `axis` into channels (tap-major)."""
  pads = [(0, 0)] * x.ndim
  pads[axis] = pad
  x = jnp.pad(x, pads)
  n_out = (x.shape[axis] - k) // stride + 1
  taps = [lax.slice_in_dim(x, t, t + (n_out - 1) * stride + 1, stride, axis=axis)
          for t in range(k)]
  return jnp.concatenate(taps, axis=-1) if k > 1 else taps[0]


def _conv2d_batched(x5, kernel2d, strides, padding):
  """A 2D conv over H, W of every depth slice: depth folds into batch."""
  b, d, h, w, c = x5.shape
  y = _native(x5.reshape(b * d, h, w, c), kernel2d, strides, padding)
  return y.reshape(b, d, *y.shape[1:])


def _depth_sum(x, kernel, strides, padding):
  """Sum over depth taps of 2D convs on shifted depth slices."""
  kd, sd = kernel.shape[0], strides[0]
  xp = jnp.pad(x, ((0, 0), padding[0], (0, 0), (0, 0), (0, 0)))
  d_out = (xp.shape[1] - kd) // sd + 1
  out = None
  for z in range(kd):
    xz = lax.slice_in_dim(xp, z, z + (d_out - 1) * sd + 1, sd, axis=1)
    yz = _conv2d_batched(xz, kernel[z], strides[1:], padding[1:])
    out = yz if out is None else out + yz
  return out


def _depth_fold(x, kernel, strides, padding):
  """Depth taps folded into channels: one 2D conv with kd*Cin input channels."""
  kd, kh, kw, cin, cout = kernel.shape
  xf = _fold_taps(x, 1, kd, strides[0], padding[0])
  # Folded channels are (depth tap, cin); the kernel's input axis must match.
  kf = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kd * cin, cout)
  return _conv2d_batched(xf, kf, strides[1:], padding[1:])


def _im2col(x, kernel, strides, padding):
  """All taps folded into channels: one GEMM (out_voxels, k^3*Cin) @ (k^3*Cin, Cout)."""
  xf = x
  for axis in (1, 2, 3):
    xf = _fold_taps(xf, axis, kernel.shape[axis - 1], strides[axis - 1], padding[axis - 1])
  # Folding depth, then height, then width leaves channels ordered (w tap, h tap, d tap, cin).
  kf = jnp.transpose(kernel, (2, 1, 0, 3, 4)).reshape(-1, kernel.shape[-1])
  # A rank-2 matmul: its gradients are rank-2 matmuls too, 1.3-2x faster on XLA:CPU than those
  # of a rank-5 dot_general (and 2-4x faster than the native 1^3 conv's gradients).
  y = xf.reshape(-1, xf.shape[-1]) @ kf
  return y.reshape(*xf.shape[:-1], kf.shape[-1])


def _depth_chunks(d_out, rows_per_slice, cin):
  """(chunk size, number of chunks) in output depth slices for the kernel gradient."""
  target_rows = max(_DW_CHUNK_MIN_ROWS, _DW_CHUNK_FLOATS // max(cin, 1))
  n_chunks = min(d_out, _DW_MAX_CHUNKS, max(1, -(-d_out * rows_per_slice // target_rows)))
  size = -(-d_out // n_chunks)
  return size, -(-d_out // size)


def _chunked_kernel_grad(lowering, x, kernel, ct, strides, padding):
  """d(conv)/d(kernel) as a sum over output-depth chunks of the lowering's own kernel grad.

  The chunks are unrolled: in a `lax.fori_loop` the same kernel grads ran 10-20x slower on
  XLA:CPU. `_DW_MAX_CHUNKS` bounds the copies (and so the compile time) at large volumes.
  """
  kd, sd = kernel.shape[0], strides[0]
  d_out = ct.shape[1]
  size, _ = _depth_chunks(d_out, ct.shape[0] * ct.shape[2] * ct.shape[3], x.shape[-1])
  xp = jnp.pad(x, ((0, 0), padding[0], (0, 0), (0, 0), (0, 0)))
  no_depth_pad = ((0, 0), *padding[1:])
  dw = None
  for lo in range(0, d_out, size):
    hi = min(lo + size, d_out)
    # Output slices [lo, hi) read the padded input slices [lo * sd, (hi - 1) * sd + kd).
    x_slab = lax.slice_in_dim(xp, lo * sd, (hi - 1) * sd + kd, axis=1)
    _, vjp = jax.vjp(lambda k, x_slab=x_slab: lowering(x_slab, k, strides, no_depth_pad), kernel)
    (dw_part,) = vjp(lax.slice_in_dim(ct, lo, hi, axis=1))
    dw = dw_part if dw is None else dw + dw_part
  return dw


def _channels_major(x, padding):
  """x depth-padded and laid out (Cin, H, W, B, D): the layout XLA:CPU's kernel-gradient conv
  reads its input in, made once in the forward pass."""
  xp = jnp.pad(x, ((0, 0), padding[0], (0, 0), (0, 0), (0, 0)))
  return jnp.transpose(xp, (4, 2, 3, 0, 1))


def _depth_sum_kernel_grad(x_cm, kernel, ct, strides, padding):
  """d(depth_sum)/d(kernel) from the channels-major input, in output-depth chunks.

  Each depth tap's 2D kernel gradient reads a depth slice of `x_cm`: a plain strided copy. With
  the input in its natural layout XLA:CPU transposed every (chunk, tap) slice instead, and fused
  the producer's GroupNorm and SiLU into each of those transposes (a quarter of the AE step).
  """
  kd, sd = kernel.shape[0], strides[0]
  cin, _, _, b, _ = x_cm.shape
  d_out = ct.shape[1]
  size, _ = _depth_chunks(d_out, ct.shape[0] * ct.shape[2] * ct.shape[3], cin)
  dw = [None] * kd
  for lo in range(0, d_out, size):
    hi = min(lo + size, d_out)
    ct_chunk = lax.slice_in_dim(ct, lo, hi, axis=1)
    ct_chunk = ct_chunk.reshape(-1, *ct_chunk.shape[2:])
    for z in range(kd):
      xs = lax.slice_in_dim(x_cm, lo * sd + z, (hi - 1) * sd + z + 1, sd, axis=4)
      # Back to (B * depth, H, W, Cin): XLA folds this transpose into the one its kernel-gradient
      # conv applies, so the two cancel.
      xs = jnp.transpose(xs.reshape(*xs.shape[:3], -1), (3, 1, 2, 0))
      _, vjp = jax.vjp(lambda k, xs=xs: _native(xs, k, strides[1:], padding[1:]), kernel[z])
      (part,) = vjp(ct_chunk)
      dw[z] = part if dw[z] is None else dw[z] + part
  return jnp.stack(dw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depth_sum_vjp(x, kernel, strides, padding):
  return _depth_sum(x, kernel, strides, padding)


def _depth_sum_vjp_fwd(x, kernel, strides, padding):
  return _depth_sum(x, kernel, strides, padding), (_channels_major(x, padding), kernel)


def _depth_sum_vjp_bwd(strides, padding, res, ct):
  x_cm, kernel = res
  cin, h, w, b, dp = x_cm.shape
  lo, hi = padding[0]
  x_shape = (b, dp - lo - hi, h, w, cin)
  # The conv is linear in x: its input gradient needs only the shape of x.
  _, vjp_x = jax.vjp(lambda x: _depth_sum(x, kernel, strides, padding),
                     jnp.zeros(x_shape, ct.dtype))
  (dx,) = vjp_x(ct)
  return dx, _depth_sum_kernel_grad(x_cm, kernel, ct, strides, padding)


_depth_sum_vjp.defvjp(_depth_sum_vjp_fwd, _depth_sum_vjp_bwd)


def _with_chunked_vjp(lowering):
  """The lowering with a custom VJP: input grad by autodiff, kernel grad in depth chunks."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
  def f(x, kernel, strides, padding):
    return lowering(x, kernel, strides, padding)

  def f_fwd(x, kernel, strides, padding):
    return lowering(x, kernel, strides, padding), (x, kernel)

  def f_bwd(strides, padding, res, ct):
    x, kernel = res
    # The conv is linear in x: this vjp needs no forward values, so XLA drops the recomputation.
    _, vjp_x = jax.vjp(lambda x: lowering(x, kernel, strides, padding), x)
    (dx,) = vjp_x(ct)
    return dx, _chunked_kernel_grad(lowering, x, kernel, ct, strides, padding)

  f.defvjp(f_fwd, f_bwd)
  return f


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _native_im2col(x, kernel, strides, padding):
  return _native(x, kernel, strides, padding)


def _native_im2col_fwd(x, kernel, strides, padding):
  return _native(x, kernel, strides, padding), (x, kernel)


def _native_im2col_bwd(strides, padding, res, ct):
  # im2col is linear in (x, kernel) separately: its vjp needs no forward values.
  _, vjp = jax.vjp(lambda x, k: _im2col(x, k, strides, padding), *res)
  return vjp(ct)


_native_im2col.defvjp(_native_im2col_fwd, _native_im2col_bwd)

def _patches(x, kernel, strides, padding):
  """Every tap's (strided) input slice stacked in the kernel's own (kd, kh, kw, Cin) order: one
  matmul with the kernel as it is stored, no copy of it. For tiny volumes, where the kernel (64 MB
  at 768 channels) is the cost: its autodiff is two more plain matmuls. With oneDNN, `conv` calls
  `onednn.patches` instead, which gathers the slices inside the call."""
  k_sp = kernel.shape[:-2]
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  out_sp = [(n - k) // s + 1 for n, k, s in zip(xp.shape[1:-1], k_sp, strides)]
  taps = [lax.slice(xp, (0, *offset, 0),
                    (xp.shape[0], *(o + (n - 1) * s + 1 for o, n, s in zip(offset, out_sp, strides)),
                     xp.shape[-1]),
                    (1, *strides, 1))
          for offset in np.ndindex(*k_sp)]
  cols = jnp.stack(taps, axis=-2).reshape(x.shape[0], -1, len(taps) * x.shape[-1])
  y = matmul(cols, kernel.reshape(-1, kernel.shape[-1]))
  return y.reshape(x.shape[0], *out_sp, kernel.shape[-1])


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x (B, ..., K) @ kernel (K, N), for dense layers and `patches`: oneDNN's sgemm for large
  kernels on CPU in float32 (see _ONEDNN_MATMUL_MIN_KERNEL), jnp.dot elsewhere."""
  if (platform(x) == "cpu" and x.dtype == kernel.dtype == jnp.float32 and x.ndim >= 2
      and kernel.size >= _ONEDNN_MATMUL_MIN_KERNEL and onednn.available()):
    return onednn.matmul(x, kernel)
  return jnp.dot(x, kernel)


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
def _winograd(x, kernel, bias, strides, padding):
  along_height = kernel.shape[1] == 3 and strides[1] == 1
  n_axes = 2 if along_height and x.shape[2] * x.shape[3] >= _WINOGRAD_DH_MIN_PLANE else 1
  return _winograd_along(x, kernel, bias, strides, padding, n_axes)


def _winograd_fwd(x, kernel, bias, strides, padding):
  return _winograd(x, kernel, bias, strides, padding), (x, kernel)


def _winograd_bwd(strides, padding, res, ct):
  # Along depth only: its gradients (2D convolutions) beat those of depth and height (1D ones).
  # Linear in x and in (kernel, bias) apart: the vjp needs no forward values.
  x, kernel = res
  bias = jnp.zeros(kernel.shape[-1:], kernel.dtype)
  _, vjp = jax.vjp(lambda *a: _winograd_along(*a, strides, padding, 1), x, kernel, bias)
  return vjp(ct)


_winograd.defvjp(_winograd_fwd, _winograd_bwd)


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
  x = in_memory(x)
  u = {(): jnp.pad(x, pads + [(0, 0)] * (x.ndim - 1 - n_axes))}
  # The kernel's transform tied to x, like upsample2_conv's parity kernels.
  g = {(): _kernel_to_prepare(kernel, x)}
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
    y = _onednn(folded, g[idx], strides[n_axes:], padding[n_axes:],
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


_LOWERINGS = {
    "patches": _patches,
    "depth_sum": _depth_sum_vjp,
    "depth_fold": _with_chunked_vjp(_depth_fold),
    "im2col": _im2col,
    "native_im2col": _native_im2col,
}
