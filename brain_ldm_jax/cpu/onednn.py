"""oneDNN convolutions and matmuls for XLA:CPU, as XLA FFI custom calls: the fast CPU path of
`conv` and of large dense layers.

XLA:CPU's convolutions, and every exact rewrite of a 3D convolution into XLA operations, reach
20-50 % of this machine's GEMM peak at 16-64 channels, where PyTorch's oneDNN kernels reach about
100 % (scripts/benchmark_conv.py). This module calls oneDNN's direct convolution itself, from
inside the compiled XLA program, for the forward pass and both gradients. XLA's own matmul also
trails at the paper UNet's few-row products (36 or 288 rows against megabytes of weights), where
oneDNN's sgemm runs at PyTorch's speed: `matmul`.

The handlers are in `onednn_conv.cc`, built and registered by `ffi.load()` when the backend
is chosen: the convolution's three passes, the forward kernel's reorder on its own
(`prepare_kernel`), the three passes of a weight-bound convolution as sgemm products (`patches`),
those of the ×2 upsampling convolution as per-tap products summed into the outputs
(`upsample2_conv`), the matmul (sgemm, either operand transposed), and two scheduling tools
(`probe`, `materialize`). Every function here needs `ffi.available()`.

oneDNN runs on its own OpenMP threads (`OMP_NUM_THREADS`, default all cores), beside XLA's pool;
scripts/benchmark.py sets both to the same count.

Inside a program whose batch is sharded over devices, every custom call here runs per device on
its own examples (`partition.per_example`).
"""

from __future__ import annotations

from collections.abc import Sequence
import ctypes
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from brain_ldm_jax.cpu import ffi
from brain_ldm_jax.cpu import partition
from brain_ldm_jax.cpu.ffi import (MATERIALIZE_TARGET, MATMUL_TARGET, PATCHES_TARGET,
                                   PREPARE_TARGET, PROBE_TARGET, TARGET, UPSAMPLE_TARGET,
                                   OnednnUnavailableError)
from brain_ldm_jax.cpu.thresholds import THRESHOLDS

_FORWARD, _INPUT_GRAD, _KERNEL_GRAD = 0, 1, 2


def conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
         padding: Sequence[tuple[int, int]], bias: jax.Array | None = None, *,
         prepare_kernel: bool = False) -> jax.Array:
  """Convolution (+ bias) through oneDNN: x (B, *spatial, Cin), kernel (*k, Cin, Cout) and bias
  (Cout,), all float32. oneDNN adds the bias and sums its gradient inside the convolution.

  The forward pass reorders the kernel into the layout oneDNN's implementation wants. With
  `prepare_kernel` that reorder is a custom call of its own on the kernel alone, which XLA hoists
  out of a loop over fixed parameters (`schedule.invariant_kernels`). Same values.
  """
  bias = _checked("conv impl 'onednn'", x, kernel, bias)
  return _conv(x, kernel, bias, tuple(strides), tuple(tuple(p) for p in padding),
               "prepared" if prepare_kernel else "direct")


def patches(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
            padding: Sequence[tuple[int, int]], bias: jax.Array | None = None) -> jax.Array:
  """`conv`, computed as one sgemm of each output voxel's input taps (gathered inside the call)
  with the kernel as it is stored: for convolutions whose kernel outweighs their input
  (the `patches` lowering), where oneDNN's own convolution would reorder the kernel in every
  pass. Each gradient is one more sgemm."""
  bias = _checked("conv impl 'patches'", x, kernel, bias)
  return _conv(x, kernel, bias, tuple(strides), tuple(tuple(p) for p in padding), "patches")


def upsample2_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """`conv(upsample_nearest2(x), kernel)` (+ bias) for a 3x3x3 kernel, stride 1 and padding 1,
  x (B, D, H, W, Cin): each input voxel times each of the 27 taps (27 sgemms), then every output
  voxel sums the 27 products it reads (col2im), one spatial axis at a time. 27 multiply-adds per
  input voxel and channel pair, where the 8 sub-pixel parity convolutions take 64 and the
  upsampled input's convolution 216; the upsampled input is never built. Its gradients are the
  transposes: the cotangent's sums per input voxel and tap, then 27 sgemms each."""
  bias = _checked("onednn.upsample2_conv", x, kernel, bias)
  if x.ndim != 5 or kernel.shape[:3] != (3, 3, 3) or kernel.shape[3] != x.shape[-1]:
    raise ValueError(f"onednn.upsample2_conv takes x (B, D, H, W, Cin) and a (3, 3, 3, Cin, Cout) "
                     f"kernel, got {x.shape} and {kernel.shape}")
  return _conv(x, kernel, bias, (1, 1, 1), ((1, 1),) * 3, "upsample2")


def _checked(what, x, kernel, bias):
  """The bias (zeros for None), once the library is there and the inputs fit the handlers."""
  ffi.require(what)
  if bias is None:
    bias = jnp.zeros(kernel.shape[-1:], jnp.float32)
  if {x.dtype, kernel.dtype, bias.dtype} != {jnp.dtype(jnp.float32)}:
    raise TypeError(f"{what} takes float32 inputs, got {x.dtype}, {kernel.dtype} and bias "
                    f"{bias.dtype}")
  if not 1 <= x.ndim - 2 <= 3:
    raise ValueError(f"{what} takes 1-3 spatial dims, got input shape {x.shape}")
  return bias


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x (B, ..., K) @ kernel (K, N) -> (B, ..., N), float32, through oneDNN's sgemm (forward and
  both gradients): a dense layer. Per example under batch sharding, like `conv`."""
  ffi.require("onednn.matmul")
  if {x.dtype, kernel.dtype} != {jnp.dtype(jnp.float32)}:
    raise TypeError(f"onednn.matmul takes float32 inputs, got {x.dtype} and {kernel.dtype}")
  if x.ndim < 2 or kernel.ndim != 2 or x.shape[-1] != kernel.shape[0]:
    raise ValueError(f"onednn.matmul takes x (B, ..., K) and kernel (K, N), got {x.shape} and "
                     f"{kernel.shape}")
  return _matmul(x, kernel)


@jax.custom_vjp
def _matmul(x, kernel):
  return _matmul_call(False, False, x, kernel)


def _matmul_fwd(x, kernel):
  return _matmul(x, kernel), (x, kernel)


def _matmul_bwd(res, ct):
  x, kernel = res
  dx = _matmul_call(False, True, ct, kernel)
  dk = _matmul_kernel_grad_call(True, False, x, ct)
  return dx, dk


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _gemm(trans_a, trans_b, a, b):
  """op(a) @ op(b) (see the handler): a (rows..., cols), transposed: (cols, b's columns)."""
  n = b.shape[0] if trans_b else b.shape[-1]
  out_shape = (a.shape[-1], n) if trans_a else (*a.shape[:-1], n)
  contraction = int(np.prod(a.shape[:-1])) if trans_a else a.shape[-1]
  return jax.ffi.ffi_call(MATMUL_TARGET, jax.ShapeDtypeStruct(out_shape, jnp.float32),
                          vmap_method="sequential")(
                              a, b, trans_a=np.int64(trans_a), trans_b=np.int64(trans_b),
                              contraction=np.int64(contraction))


def probe(x: jax.Array) -> jax.Array:
  """x's first element per example, (B,) float32, read by a custom call from x in memory.

  For ordering a hand-written backward pass (`schedule.after`): XLA cannot fuse x's producer into
  a custom call, so whatever is tied to the probe waits for x itself. A plain slice of x gets
  fused with x's producer, which then keeps x's inputs alive for that one element. Built with
  the convolution handler: needs `ffi.available()`. Takes float32 or bfloat16; no gradient.
  """
  ffi.require("probe")
  return _probe_call(jax.lax.stop_gradient(x))


@jax.custom_jvp
def materialize(x: jax.Array) -> jax.Array:
  """x, computed once into memory: a fusion barrier for XLA:CPU (a custom call whose output
  aliases its input, so no copy).

  XLA fuses an elementwise producer into every consumer that can take it, recomputing it per
  consumer and keeping its inputs alive until the last; an expensive part shared by them (an exp)
  is materialised on its own. Behind this call the producer runs once. (XLA:CPU drops
  `lax.optimization_barrier` before fusion.) Needs `ffi.available()`; differentiates as identity.
  """
  ffi.require("materialize")
  return _materialize_call(x)


@materialize.defjvp
def _materialize_jvp(primals, tangents):
  return materialize(primals[0]), tangents[0]


def hlo_flops(hlo_text: str) -> float:
  """FLOPs of this module's convolutions and matmuls in a compiled HLO module's text.

  XLA's cost analysis counts a custom call as zero FLOPs; add this to it. Each convolution pass
  (forward, input gradient, kernel gradient) is 2 * output voxels * kernel volume * Cin * Cout
  (input voxels for `upsample2_conv`), each matmul 2 * result elements * contraction; a call
  inside a loop body is counted once.
  """
  total = 0.0
  for line in hlo_text.splitlines():
    if f'custom_call_target="{MATMUL_TARGET}"' in line:
      result = re.search(r"= f32\[([\d,]*)\]", line).group(1)
      contraction = int(re.search(r"contraction = (\d+) : i64", line).group(1))
      total += 2.0 * np.prod([int(d) for d in result.split(",") if d]) * contraction
    targets = (TARGET, PATCHES_TARGET, UPSAMPLE_TARGET)
    if not any(f'custom_call_target="{t}"' in line for t in targets):
      continue
    attrs = {name: _dense_ints(values, int(n))
             for name, values, n in re.findall(r"(\w+) = dense<([^>]*)> : tensor<(\d+)xi64>", line)}
    # An upsampling convolution multiplies each input voxel (not each output voxel) by the taps.
    voxels = attrs["x_shape" if UPSAMPLE_TARGET in line else "y_shape"][:-1]
    total += 2.0 * np.prod(voxels) * np.prod(attrs["kernel_shape"])
  return total


def _dense_ints(values: str, n: int) -> list[int]:
  ints = [int(v) for v in re.findall(r"-?\d+", values)]
  return ints * n if len(ints) == 1 else ints  # a splat prints one value


def output_shape(x_shape, kernel_shape, strides, padding) -> tuple[int, ...]:
  spatial = tuple((n + lo + hi - k) // s + 1 for n, k, s, (lo, hi)
                  in zip(x_shape[1:-1], kernel_shape[:-2], strides, padding))
  return (x_shape[0], *spatial, kernel_shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _conv(x, kernel, bias, strides, padding, mode):
  """mode: "direct" (oneDNN's convolution), "prepared" (the same, its kernel reorder a call of its
  own), "patches" (the sgemm handler) or "upsample2" (`upsample2_conv`'s)."""
  if mode == "upsample2":
    y_shape = (x.shape[0], *(2 * n for n in x.shape[1:-1]), kernel.shape[-1])
  else:
    y_shape = output_shape(x.shape, kernel.shape, strides, padding)
  geometry = _geometry(x.shape, kernel.shape, y_shape, strides, padding)
  if mode == "prepared":
    (y,) = _forward_ready(geometry, x, _prepare(geometry, x.shape[0], kernel), bias)
  else:
    (y,) = _conv_call(_target(mode), _FORWARD, geometry, x, kernel, bias)
  return y


def _conv_fwd(x, kernel, bias, strides, padding, mode):
  return _conv(x, kernel, bias, strides, padding, mode), (x, kernel)


def _conv_bwd(strides, padding, mode, res, ct):
  # The gradients take the kernel as it is.
  x, kernel = res
  geometry = _geometry(x.shape, kernel.shape, ct.shape, strides, padding)
  (dx,) = _input_grad_call(_target(mode), _INPUT_GRAD, geometry, ct, kernel)
  dk, dbias = _kernel_grad_call(_target(mode), _KERNEL_GRAD, geometry, x, ct)
  return dx, dk, dbias


def _target(mode):
  return {"patches": PATCHES_TARGET, "upsample2": UPSAMPLE_TARGET}.get(mode, TARGET)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _geometry(x_shape, kernel_shape, y_shape, strides, padding):
  """A convolution's shapes without the batch size (which sharding changes): hashable."""
  return (tuple(x_shape[1:]), tuple(kernel_shape), tuple(y_shape[1:]), tuple(strides),
          tuple(tuple(p) for p in padding))


def _conv_pass(target, pass_, geometry, a, b, *bias):
  """One pass of a convolution handler on `a`'s batch (forward: x, w, bias; input gradient: dy,
  w; kernel gradient: x, dy)."""
  return _handler_call(pass_, geometry, (a, b, *bias), kernel_ready=False, target=target)


def _forward_ready(geometry, x, kernel_ready, bias):
  """The forward pass with a kernel from `_prepare` for this batch size."""
  return _handler_call(_FORWARD, geometry, (x, kernel_ready, bias), kernel_ready=True)


def _handler_call(pass_, geometry, operands, kernel_ready, target=TARGET):
  x_rest, kernel_shape, y_rest, _, _ = geometry
  batch = operands[0].shape[0]
  x_shape, y_shape = (batch, *x_rest), (batch, *y_rest)
  out_shapes = {_FORWARD: [y_shape], _INPUT_GRAD: [x_shape],
                _KERNEL_GRAD: [kernel_shape, kernel_shape[-1:]]}[pass_]
  attrs = _problem_attrs(geometry, batch)
  if target != TARGET:
    attrs["blocked"] = np.int64(0)
  return tuple(jax.ffi.ffi_call(
      target, [jax.ShapeDtypeStruct(s, jnp.float32) for s in out_shapes],
      vmap_method="sequential")(
          *operands, pass_=np.int64(pass_), kernel_ready=np.int64(kernel_ready), **attrs))


def _prepare(geometry, batch, kernel):
  """The kernel in the layout the forward pass on `batch` examples wants, for `_forward_ready`:
  a flat, opaque float32 array (oneDNN's layout may pad the kernel); depends on the kernel
  alone."""
  size = -(-_prepared_kernel_bytes(geometry, batch) // 4)
  return jax.ffi.ffi_call(PREPARE_TARGET, jax.ShapeDtypeStruct((size,), jnp.float32),
                          vmap_method="sequential")(kernel, **_problem_attrs(geometry, batch))


@functools.cache
def _prepared_kernel_bytes(geometry, batch) -> int:
  attrs = _problem_attrs(geometry, batch)
  arrays = [np.ascontiguousarray(attrs[name]) for name in
            ("x_shape", "kernel_shape", "y_shape", "strides", "pad_lo", "pad_hi")]
  pointer = ctypes.POINTER(ctypes.c_int64)
  size = ffi.handler_library().BldmOnednnPreparedKernelBytes(
      ctypes.c_int64(int(attrs["blocked"])), ctypes.c_int64(len(geometry[3])),
      *(a.ctypes.data_as(pointer) for a in arrays))
  if size < 0:
    raise OnednnUnavailableError(f"oneDNN has no forward convolution for {geometry}")
  return size


def _problem_attrs(geometry, batch):
  x_rest, kernel_shape, y_rest, strides, padding = geometry
  as_attr = lambda v: np.asarray(v, np.int64)  # noqa: E731
  return dict(blocked=np.int64(_blocked_layout(kernel_shape)),
              x_shape=as_attr((batch, *x_rest)), kernel_shape=as_attr(kernel_shape),
              y_shape=as_attr((batch, *y_rest)), strides=as_attr(strides),
              pad_lo=as_attr([lo for lo, _ in padding]), pad_hi=as_attr([hi for _, hi in padding]))




def _blocked_layout(kernel_shape) -> bool:
  """Whether the call converts the activations to oneDNN's blocked layout, where oneDNN picks its
  direct kernels and reorders the kernel faster (3D, several taps, many channels)."""
  taps = kernel_shape[:-2]
  return (len(taps) == 3 and int(np.prod(taps)) > 1
          and min(kernel_shape[-2:]) >= THRESHOLDS["blocked_min_channels"])


def _probe(x):
  return jax.ffi.ffi_call(PROBE_TARGET, jax.ShapeDtypeStruct(x.shape[:1], jnp.float32),
                          vmap_method="sequential")(x)


def _materialize(x):
  return jax.ffi.ffi_call(MATERIALIZE_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype),
                          input_output_aliases={0: 0}, vmap_method="broadcast_all")(x)


_conv_call = partition.per_example(_conv_pass, 3, (True, False, False), (True,))
_input_grad_call = partition.per_example(_conv_pass, 3, (True, False), (True,))
_kernel_grad_call = partition.per_example(_conv_pass, 3, (True, True), (False, False))
_matmul_call = partition.per_example(_gemm, 2, (True, False), True)
_matmul_kernel_grad_call = partition.per_example(_gemm, 2, (True, True), False)
_probe_call = partition.per_example(_probe, 0, (True,), True)
_materialize_call = partition.per_example(_materialize, 0, (True,), True)
