"""oneDNN convolutions and matmuls for XLA:CPU, as XLA FFI custom calls: the fast CPU path of
`conv` and of large dense layers.

XLA:CPU's convolutions, and every exact rewrite of a 3D convolution into XLA operations, reach
20-50 % of this machine's GEMM peak at 16-64 channels, where PyTorch's oneDNN kernels reach about
100 % (scripts/benchmark_conv.py). This module calls oneDNN's direct convolution itself, from
inside the compiled XLA program, for the forward pass and both gradients. XLA's own matmul also
trails at the paper UNet's few-row products (36 or 288 rows against megabytes of weights), where
oneDNN's sgemm runs at PyTorch's speed: `matmul`.

How it is put together:
  * `onednn_conv.cc` (next to this file) holds the FFI handlers over oneDNN's C API: the
    convolution's three passes, the forward kernel's reorder on its own (`prepare_kernel`), the
    three passes of a weight-bound convolution as sgemm products (`patches`), those of the
    ×2 upsampling convolution as per-tap products summed into the outputs (`upsample2_conv`),
    the matmul (sgemm, either operand transposed), and two scheduling tools (`probe`,
    `materialize`). It is compiled on first use with the system C++ compiler against the
    installed jaxlib's FFI headers, into a per-user cache (`$BRAIN_LDM_CACHE`, default
    ~/.cache/brain_ldm_jax, or the temp directory when that is read-only), keyed by the source
    and the jaxlib version; later processes load the cached library. Building takes a few
    seconds.
  * oneDNN itself comes from the `onednn-cpu-gomp` wheel (a dependency on Linux x86-64), or from
    the library `$BRAIN_LDM_ONEDNN_LIB` names. It is opened with dlopen; nothing is linked.
  * `available()` says whether all of that worked; `unavailable_reason()` says why not. `conv`'s
    `impl="auto"` and `conv_lowering.matmul` use this path only when it is available, on CPU,
    in float32.

oneDNN runs on its own OpenMP threads (`OMP_NUM_THREADS`, default all cores), beside XLA's pool;
scripts/benchmark.py sets both to the same count.

Inside a program whose batch is sharded over devices, every custom call here runs per device on
its own examples (`_per_example`, a custom partitioning rule): XLA cannot see into a custom call
and would otherwise gather every operand onto every device and run the whole batch everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
from pathlib import Path
import re
import shutil
import subprocess
import tempfile

import jax
from jax.experimental.custom_partitioning import custom_partitioning
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

_TARGET = "brain_ldm_jax_onednn_conv"
_PATCHES_TARGET = "brain_ldm_jax_patches_conv"
_UPSAMPLE_TARGET = "brain_ldm_jax_upsample_conv"
_PREPARE_TARGET = "brain_ldm_jax_onednn_prepare_kernel"
_MATMUL_TARGET = "brain_ldm_jax_onednn_matmul"
_PROBE_TARGET = "brain_ldm_jax_probe"
_MATERIALIZE_TARGET = "brain_ldm_jax_materialize"
_SOURCE = Path(__file__).with_name("onednn_conv.cc")
_DIST = "onednn-cpu-gomp"
_LIB_NAME = "libdnnl.so.3"

_FORWARD, _INPUT_GRAD, _KERNEL_GRAD = 0, 1, 2


class OnednnUnavailableError(RuntimeError):
  """The oneDNN convolution could not be built or loaded; the message says why."""


def available() -> bool:
  """Whether the oneDNN convolution is built, loaded and registered with XLA (built on first call)."""
  return _setup() is None


def unavailable_reason() -> str | None:
  """None when `available()`, else why not (missing library, compiler, build error...)."""
  return _setup()


def conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
         padding: Sequence[tuple[int, int]], bias: jax.Array | None = None, *,
         prepare_kernel: bool = False) -> jax.Array:
  """Convolution (+ bias) through oneDNN: x (B, *spatial, Cin), kernel (*k, Cin, Cout) and bias
  (Cout,), all float32. oneDNN adds the bias and sums its gradient inside the convolution.

  The forward pass reorders the kernel into the layout oneDNN's implementation wants. With
  `prepare_kernel` that reorder is a custom call of its own on the kernel alone, which XLA hoists
  out of a loop over fixed parameters (`conv_lowering.invariant_kernels`). Same values.
  """
  bias = _checked("conv impl 'onednn'", x, kernel, bias)
  return _conv(x, kernel, bias, tuple(strides), tuple(tuple(p) for p in padding),
               "prepared" if prepare_kernel else "direct")


def patches(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
            padding: Sequence[tuple[int, int]], bias: jax.Array | None = None) -> jax.Array:
  """`conv`, computed as one sgemm of each output voxel's input taps (gathered inside the call)
  with the kernel as it is stored: for convolutions whose kernel outweighs their input
  (conv_lowering's `patches`), where oneDNN's own convolution would reorder the kernel in every
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
  reason = _setup()
  if reason is not None:
    raise OnednnUnavailableError(f"{what} is unavailable: {reason}")
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
  reason = _setup()
  if reason is not None:
    raise OnednnUnavailableError(f"onednn.matmul is unavailable: {reason}")
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
  return jax.ffi.ffi_call(_MATMUL_TARGET, jax.ShapeDtypeStruct(out_shape, jnp.float32),
                          vmap_method="sequential")(
                              a, b, trans_a=np.int64(trans_a), trans_b=np.int64(trans_b),
                              contraction=np.int64(contraction))


def probe(x: jax.Array) -> jax.Array:
  """x's first element per example, (B,) float32, read by a custom call from x in memory.

  For ordering a hand-written backward pass (`layers.after`): XLA cannot fuse x's producer into
  a custom call, so whatever is tied to the probe waits for x itself. A plain slice of x gets
  fused with x's producer, which then keeps x's inputs alive for that one element. Built with
  the convolution handler: needs `available()`. Takes float32 or bfloat16; no gradient.
  """
  if _setup() is not None:
    raise OnednnUnavailableError(f"probe is unavailable: {_setup()}")
  return _probe_call(jax.lax.stop_gradient(x))


@jax.custom_jvp
def materialize(x: jax.Array) -> jax.Array:
  """x, computed once into memory: a fusion barrier for XLA:CPU (a custom call whose output
  aliases its input, so no copy).

  XLA fuses an elementwise producer into every consumer that can take it, recomputing it per
  consumer and keeping its inputs alive until the last; an expensive part shared by them (an exp)
  is materialised on its own. Behind this call the producer runs once. (XLA:CPU drops
  `lax.optimization_barrier` before fusion.) Needs `available()`; differentiates as identity.
  """
  if _setup() is not None:
    raise OnednnUnavailableError(f"materialize is unavailable: {_setup()}")
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
    if f'custom_call_target="{_MATMUL_TARGET}"' in line:
      result = re.search(r"= f32\[([\d,]*)\]", line).group(1)
      contraction = int(re.search(r"contraction = (\d+) : i64", line).group(1))
      total += 2.0 * np.prod([int(d) for d in result.split(",") if d]) * contraction
    targets = (_TARGET, _PATCHES_TARGET, _UPSAMPLE_TARGET)
    if not any(f'custom_call_target="{t}"' in line for t in targets):
      continue
    attrs = {name: _dense_ints(values, int(n))
             for name, values, n in re.findall(r"(\w+) = dense<([^>]*)> : tensor<(\d+)xi64>", line)}
    # An upsampling convolution multiplies each input voxel (not each output voxel) by the taps.
    voxels = attrs["x_shape" if _UPSAMPLE_TARGET in line else "y_shape"][:-1]
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
  return {"patches": _PATCHES_TARGET, "upsample2": _UPSAMPLE_TARGET}.get(mode, _TARGET)


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


def _handler_call(pass_, geometry, operands, kernel_ready, target=_TARGET):
  x_rest, kernel_shape, y_rest, _, _ = geometry
  batch = operands[0].shape[0]
  x_shape, y_shape = (batch, *x_rest), (batch, *y_rest)
  out_shapes = {_FORWARD: [y_shape], _INPUT_GRAD: [x_shape],
                _KERNEL_GRAD: [kernel_shape, kernel_shape[-1:]]}[pass_]
  attrs = _problem_attrs(geometry, batch)
  if target != _TARGET:
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
  return jax.ffi.ffi_call(_PREPARE_TARGET, jax.ShapeDtypeStruct((size,), jnp.float32),
                          vmap_method="sequential")(kernel, **_problem_attrs(geometry, batch))


@functools.cache
def _prepared_kernel_bytes(geometry, batch) -> int:
  attrs = _problem_attrs(geometry, batch)
  arrays = [np.ascontiguousarray(attrs[name]) for name in
            ("x_shape", "kernel_shape", "y_shape", "strides", "pad_lo", "pad_hi")]
  pointer = ctypes.POINTER(ctypes.c_int64)
  size = _handler().BldmOnednnPreparedKernelBytes(
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




# 3D convolutions with at least this many input and output channels (and more than one tap) run
# on activations in oneDNN's own blocked layout (reordered in and out inside the call, a few
# hundred microseconds at these sizes), where oneDNN picks its direct "jit" kernels over the
# channels-last "brgconv" ones, and the kernel reorder is cheaper. Forward, in one process on a
# 2-core Intel Xeon (Emerald Rapids), channels-last vs blocked: 6x8x6, 512 -> 512: 18.9 vs 15.7 ms;
# 768 -> 768: 52.5 vs 36.2; 1280 -> 512: 86.0 vs 43.0; 10x14x10, 512: 68 vs 57 (with gradients
# 198 vs 181). At 256 channels they tie (6x8x6) or channels-last wins (12x16x12, 20x28x20), as
# it does at 16-128 channels, for 1x1x1 kernels and for winograd's 1D and 2D convolutions.
_BLOCKED_MIN_CHANNELS = 512


def _blocked_layout(kernel_shape) -> bool:
  """Whether the call converts the activations to oneDNN's blocked layout (see above)."""
  taps = kernel_shape[:-2]
  return (len(taps) == 3 and int(np.prod(taps)) > 1
          and min(kernel_shape[-2:]) >= _BLOCKED_MIN_CHANNELS)


def _probe(x):
  return jax.ffi.ffi_call(_PROBE_TARGET, jax.ShapeDtypeStruct(x.shape[:1], jnp.float32),
                          vmap_method="sequential")(x)


def _materialize(x):
  return jax.ffi.ffi_call(_MATERIALIZE_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype),
                          input_output_aliases={0: 0}, vmap_method="broadcast_all")(x)


# ---- Batch-sharded programs: each device calls the handler on its own examples. ----

def _per_example(fn, n_static: int, batched_args: tuple[bool, ...],
                 batched_results: bool | tuple[bool, ...]):
  """`fn(*static, *arrays)` partitioned over the batch (leading) dimension of the arrays marked
  in `batched_args` / `batched_results` (a bool when fn returns one array, a tuple when it
  returns a tuple); the other arrays are whole on every device.

  A result without the batch dimension computed from batched arguments is a sum over the
  examples (the kernel and bias gradients): each device sums its own, then one all-reduce. On a
  single device this is `fn` itself.
  """
  single = isinstance(batched_results, bool)
  batched_results = (batched_results,) if single else batched_results
  wrapped = custom_partitioning(fn, static_argnums=tuple(range(n_static)))

  def batch_axes(arg_shapes, result_shapes):
    """The mesh axes the batch is split over: an operand's, else the one proposed for a result
    (an operand may be a replicated constant)."""
    for batched, array in zip(batched_args + batched_results, (*arg_shapes, *result_shapes)):
      spec = tuple(array.sharding.spec) if batched and array.sharding is not None else ()
      if spec and spec[0] is not None:
        return spec[0]
    return None

  def shardings(mesh, arg_shapes, result_shapes):
    axes = batch_axes(arg_shapes, result_shapes)

    def sharding(batched, ndim):
      return NamedSharding(mesh, P(axes if batched else None, *(None,) * (ndim - 1)))

    args = tuple(sharding(b, len(a.shape)) for b, a in zip(batched_args, arg_shapes))
    results = tuple(sharding(b, len(r.shape)) for b, r in zip(batched_results, result_shapes))
    return axes, args, results[0] if single else results

  def partition(*static_and_shapes):
    *static, mesh, arg_shapes, result_shape = static_and_shapes
    result_shapes = (result_shape,) if single else result_shape
    axes, args, results = shardings(mesh, arg_shapes, result_shapes)

    def lower_fn(*arrays):
      out = fn(*static, *arrays)
      if axes is None:
        return out
      outs = (out,) if single else out
      outs = tuple(o if b else jax.lax.psum(o, axes) for o, b in zip(outs, batched_results))
      return outs[0] if single else outs

    return mesh, lower_fn, results, args

  def infer_sharding_from_operands(*static_and_shapes):
    *_, mesh, arg_shapes, result_shape = static_and_shapes
    result_shapes = (result_shape,) if single else result_shape
    return shardings(mesh, arg_shapes, result_shapes)[2]

  def sharding_rule(*static_and_types):
    *_, _, value_types, result_types = static_and_types
    names = iter(f"f{i}" for i in range(1000))

    def dims(batched, ty):
      rest = [next(names) for _ in range(len(ty.shape) - int(batched))]
      return " ".join((["b"] if batched else []) + rest)

    operands = ", ".join(dims(b, t) for b, t in zip(batched_args, value_types))
    results = ", ".join(dims(b, t) for b, t in zip(batched_results, result_types))
    summed = any(batched_args) and not all(batched_results)
    return f"{operands} -> {results}", {"reduction_factors": ("b",)} if summed else {}

  wrapped.def_partition(partition, infer_sharding_from_operands=infer_sharding_from_operands,
                        sharding_rule=sharding_rule)

  def call(*args):
    static, arrays = args[:n_static], args[n_static:]

    # custom_partitioning has no batching rule: under vmap, fn's own ffi_call batches.
    @jax.custom_batching.custom_vmap
    def op(*arrays):
      return wrapped(*static, *arrays)

    @op.def_vmap
    def op_vmap(axis_size, in_batched, *arrays):
      del axis_size
      in_axes = tuple(0 if batched else None for batched in in_batched)
      out = jax.vmap(functools.partial(fn, *static), in_axes=in_axes)(*arrays)
      return out, jax.tree.map(lambda _: True, out)

    return op(*arrays)

  return call


_conv_call = _per_example(_conv_pass, 3, (True, False, False), (True,))
_input_grad_call = _per_example(_conv_pass, 3, (True, False), (True,))
_kernel_grad_call = _per_example(_conv_pass, 3, (True, True), (False, False))
_matmul_call = _per_example(_gemm, 2, (True, False), True)
_matmul_kernel_grad_call = _per_example(_gemm, 2, (True, True), False)
_probe_call = _per_example(_probe, 0, (True,), True)
_materialize_call = _per_example(_materialize, 0, (True,), True)


# ---- Building, loading and registering the handler (once per process). ----

@functools.cache
def _handler() -> ctypes.CDLL:
  return ctypes.CDLL(str(_build()))


@functools.cache
def _setup() -> str | None:
  """Builds/loads the handler and registers it; returns None, or why the path is unavailable."""
  try:
    library = _onednn_library()
    handler = _handler()
    handler.BldmOnednnLoad.restype = ctypes.c_char_p
    handler.BldmOnednnLoad.argtypes = [ctypes.c_char_p]
    handler.BldmOnednnPreparedKernelBytes.restype = ctypes.c_int64
    error = handler.BldmOnednnLoad(str(library).encode())
    if error is not None:
      raise OnednnUnavailableError(error.decode())
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(handler.BldmOnednnConvolution),
                                platform="cpu")
    jax.ffi.register_ffi_target(_PATCHES_TARGET,
                                jax.ffi.pycapsule(handler.BldmPatchesConvolution),
                                platform="cpu")
    jax.ffi.register_ffi_target(_UPSAMPLE_TARGET,
                                jax.ffi.pycapsule(handler.BldmUpsampleConvolution),
                                platform="cpu")
    jax.ffi.register_ffi_target(_PREPARE_TARGET,
                                jax.ffi.pycapsule(handler.BldmOnednnPrepareKernel),
                                platform="cpu")
    jax.ffi.register_ffi_target(_MATMUL_TARGET, jax.ffi.pycapsule(handler.BldmOnednnMatmul),
                                platform="cpu")
    jax.ffi.register_ffi_target(_PROBE_TARGET, jax.ffi.pycapsule(handler.BldmProbe),
                                platform="cpu")
    jax.ffi.register_ffi_target(_MATERIALIZE_TARGET, jax.ffi.pycapsule(handler.BldmMaterialize),
                                platform="cpu")
  except (OnednnUnavailableError, OSError) as e:
    logging.warning("brain_ldm_jax: oneDNN convolutions unavailable, CPU convolutions use the "
                    "slower XLA lowerings: %s", e)
    return str(e)
  return None


def _onednn_library() -> Path:
  override = os.environ.get("BRAIN_LDM_ONEDNN_LIB")
  if override:
    if not Path(override).is_file():
      raise OnednnUnavailableError(f"BRAIN_LDM_ONEDNN_LIB={override} is not a file")
    return Path(override)
  try:
    files = importlib.metadata.distribution(_DIST).files or []
  except importlib.metadata.PackageNotFoundError:
    raise OnednnUnavailableError(
        f"the {_DIST} package is not installed (pip install {_DIST}), and BRAIN_LDM_ONEDNN_LIB "
        "names no oneDNN v3 library") from None
  for f in files:
    if f.name == _LIB_NAME:
      return Path(f.locate()).resolve()
  raise OnednnUnavailableError(f"the {_DIST} package has no {_LIB_NAME}")


def _cache_dirs() -> list[Path]:
  if os.environ.get("BRAIN_LDM_CACHE"):
    return [Path(os.environ["BRAIN_LDM_CACHE"])]
  user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
  # A read-only home (some CI and cluster setups) falls back to the temp directory.
  return [user_cache / "brain_ldm_jax",
          Path(tempfile.gettempdir()) / f"brain_ldm_jax-{os.getuid()}"]


def _build() -> Path:
  """The compiled handler: from the cache when its source and jaxlib are unchanged, else built."""
  import jaxlib  # pylint: disable=g-import-not-at-top

  source = _SOURCE.read_bytes()
  # -O3: GCC vectorizes the handlers' summing loops (unknown trip counts) only from there.
  flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-w"]
  key = hashlib.sha256(source + jaxlib.__version__.encode() + " ".join(flags).encode())
  name = f"onednn_conv-{key.hexdigest()[:16]}.so"
  for cache in _cache_dirs():
    if (cache / name).is_file():
      return cache / name
  compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if compiler is None:
    raise OnednnUnavailableError("no C++ compiler found (set CXX, or install g++)")
  errors = []
  for cache in _cache_dirs():
    try:
      cache.mkdir(parents=True, exist_ok=True)
      return _compile(compiler, flags, cache / name)
    except PermissionError as e:
      errors.append(str(e))
  raise OnednnUnavailableError(f"no writable cache directory for {name}: {'; '.join(errors)}")


def _compile(compiler: str, flags: list[str], target: Path) -> Path:
  # Build beside the target and rename: concurrent processes never load a half-written library.
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    partial = Path(tmp) / target.name
    cmd = [compiler, *flags, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(partial), "-ldl"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
      raise OnednnUnavailableError(f"building {_SOURCE.name} failed ({' '.join(cmd)}):\n"
                                   f"{done.stderr[-2000:]}")
    os.replace(partial, target)
  return target
