"""Exact rewrites of a 3D convolution into XLA operations, for XLA:CPU, and the dense matmul.

XLA:CPU's native 3D convolution is several times slower than PyTorch's; these compute the same
sums in another order (`dispatch.choose_impl` picks one by shape):
  depth_sum   sum over the kd depth taps of 2D convs on shifted depth slices (depth folded into
              batch). Custom VJP: the input grad is the autodiff of this lowering; the kernel grad
              is the per-tap 2D kernel grads summed over output-depth chunks, read from a
              channels-major copy of the input made once in the forward pass.
  depth_fold  the kd depth taps folded into channels: one 2D conv with kd*Cin input channels.
              Custom VJP with chunked kernel grads of the lowering itself. Best where Cin is small.
  im2col      all taps folded into channels: one matmul (out_voxels, k^3*Cin) @ (k^3*Cin, Cout).
              Pays only for 1^3 kernels and for Cin = 1 (XLA:CPU's 27-way concatenation is slow).
  native_im2col  the native conv forward with im2col's matmul gradients (1^3 kernels, tiny inputs).
  patches     every tap's input slice stacked in the kernel's own order: one matmul with the
              kernel as stored, two for the gradients; for tiny volumes with large kernels.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from brain_ldm_jax.cpu import ffi
from brain_ldm_jax.cpu import onednn
from brain_ldm_jax.cpu import schedule
from brain_ldm_jax.cpu.thresholds import THRESHOLDS

def native(x, kernel, strides, padding):
  """lax.conv_general_dilated, channels last, any number of spatial dims."""
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
  y = native(x5.reshape(b * d, h, w, c), kernel2d, strides, padding)
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
  # A rank-2 matmul: its gradients are rank-2 matmuls too, faster on XLA:CPU than those of a
  # rank-5 dot_general (and than the native 1^3 conv's gradients).
  y = xf.reshape(-1, xf.shape[-1]) @ kf
  return y.reshape(*xf.shape[:-1], kf.shape[-1])


def _depth_chunks(d_out, rows_per_slice, cin):
  """(chunk size, number of chunks) in output depth slices for the kernel gradient."""
  target_rows = max(THRESHOLDS["dw_chunk_min_rows"], THRESHOLDS["dw_chunk_floats"] // max(cin, 1))
  n_chunks = min(d_out, THRESHOLDS["dw_max_chunks"],
                 max(1, -(-d_out * rows_per_slice // target_rows)))
  size = -(-d_out // n_chunks)
  return size, -(-d_out // size)


def _chunked_kernel_grad(lowering, x, kernel, ct, strides, padding):
  """d(conv)/d(kernel) as a sum over output-depth chunks of the lowering's own kernel grad.

  The chunks are unrolled: in a `lax.fori_loop` the same kernel grads ran 10-20x slower on
  XLA:CPU. THRESHOLDS["dw_max_chunks"] bounds the copies (and so the compile time) at large volumes.
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
      _, vjp = jax.vjp(lambda k, xs=xs: native(xs, k, strides[1:], padding[1:]), kernel[z])
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


def _with_vjp(forward, backward):
  """forward(x, kernel, strides, padding) with the custom VJP backward(x, kernel, ct, strides,
  padding) -> (dx, dkernel); only x and the kernel are kept for it."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
  def f(x, kernel, strides, padding):
    return forward(x, kernel, strides, padding)

  def f_fwd(x, kernel, strides, padding):
    return forward(x, kernel, strides, padding), (x, kernel)

  def f_bwd(strides, padding, res, ct):
    return backward(*res, ct, strides, padding)

  f.defvjp(f_fwd, f_bwd)
  return f


def _with_chunked_vjp(lowering):
  """The lowering with a custom VJP: input grad by autodiff, kernel grad in depth chunks."""

  def backward(x, kernel, ct, strides, padding):
    # The conv is linear in x: this vjp needs no forward values, so XLA drops the recomputation.
    _, vjp_x = jax.vjp(lambda x: lowering(x, kernel, strides, padding), x)
    (dx,) = vjp_x(ct)
    return dx, _chunked_kernel_grad(lowering, x, kernel, ct, strides, padding)

  return _with_vjp(lowering, backward)


def _im2col_vjp(x, kernel, ct, strides, padding):
  # im2col is linear in (x, kernel) separately: its vjp needs no forward values.
  _, vjp = jax.vjp(lambda x, k: _im2col(x, k, strides, padding), x, kernel)
  return vjp(ct)


# The native forward with im2col's matmul gradients.
_native_im2col = _with_vjp(native, _im2col_vjp)


def _patches(x, kernel, strides, padding):
  """Every tap's (strided) input slice stacked in the kernel's own (kd, kh, kw, Cin) order: one
  matmul with the kernel as it is stored, no copy of it. For tiny volumes, where the kernel is the
  cost: its autodiff is two more plain matmuls. With oneDNN, `conv` calls
  `onednn.patches` instead, which gathers the slices inside the call."""
  k_sp = kernel.shape[:-2]
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  out_sp = [(n - k) // s + 1 for n, k, s in zip(xp.shape[1:-1], k_sp, strides)]
  taps = [lax.slice(xp, (0, *offset, 0),
                    (xp.shape[0],
                     *(o + (n - 1) * s + 1 for o, n, s in zip(offset, out_sp, strides)),
                     xp.shape[-1]),
                    (1, *strides, 1))
          for offset in np.ndindex(*k_sp)]
  cols = jnp.stack(taps, axis=-2).reshape(x.shape[0], -1, len(taps) * x.shape[-1])
  y = matmul(cols, kernel.reshape(-1, kernel.shape[-1]))
  return y.reshape(x.shape[0], *out_sp, kernel.shape[-1])


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x (B, ..., K) @ kernel (K, N), for dense layers and `patches`: oneDNN's sgemm for large
  kernels on CPU in float32 (THRESHOLDS["onednn_matmul_min_kernel"]), jnp.dot elsewhere."""
  if (schedule.platform(x) == "cpu" and x.dtype == kernel.dtype == jnp.float32 and x.ndim >= 2
      and kernel.size >= THRESHOLDS["onednn_matmul_min_kernel"] and ffi.available()):
    return onednn.matmul(x, kernel)
  return jnp.dot(x, kernel)


LOWERINGS = {
    "patches": _patches,
    "depth_sum": _depth_sum_vjp,
    "depth_fold": _with_chunked_vjp(_depth_fold),
    "im2col": _im2col,
    "native_im2col": _native_im2col,
}
