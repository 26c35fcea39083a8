"""oneDNN convolutions for XLA:CPU, as an XLA FFI custom call: the fast CPU path of `conv`.

XLA:CPU's convolutions, and every exact rewrite of a 3D convolution into XLA operations, reach
20-50 % of this machine's GEMM peak at 16-64 channels, where PyTorch's oneDNN kernels reach about
100 % (scripts/benchmark_conv.py). This module calls oneDNN's direct convolution itself, from
inside the compiled XLA program, for the forward pass and both gradients.

How it is put together:
  * `onednn_conv.cc` (next to this file) is one FFI handler over oneDNN's C API. It is compiled
    on first use with the system C++ compiler against the installed jaxlib's FFI headers, into a
    per-user cache (`$BRAIN_LDM_CACHE`, default ~/.cache/brain_ldm_jax, or the temp directory
    when that is read-only), keyed by the source and the jaxlib version; later processes load the
    cached library. Building takes a few seconds.
  * oneDNN itself comes from the `onednn-cpu-gomp` wheel (a dependency on Linux x86-64), or from
    the library `$BRAIN_LDM_ONEDNN_LIB` names. It is opened with dlopen; nothing is linked.
  * `available()` says whether all of that worked; `unavailable_reason()` says why not. `conv`'s
    `impl="auto"` uses this path only when it is available, on CPU, in float32.

oneDNN runs on its own OpenMP threads (`OMP_NUM_THREADS`, default all cores), beside XLA's pool;
scripts/benchmark.py sets both to the same count.

Inside a batch-sharded program XLA does not partition a custom call: each device runs the whole
batch's convolution on gathered inputs. The results are the same; multi-device CPU runs (tests)
are slower than they could be.
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
import jax.numpy as jnp
import numpy as np

_TARGET = "brain_ldm_jax_onednn_conv"
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
         padding: Sequence[tuple[int, int]], bias: jax.Array | None = None) -> jax.Array:
  """Convolution (+ bias) through oneDNN: x (B, *spatial, Cin), kernel (*k, Cin, Cout) and bias
  (Cout,), all float32. oneDNN adds the bias and sums its gradient inside the convolution."""
  reason = _setup()
  if reason is not None:
    raise OnednnUnavailableError(f"conv impl 'onednn' is unavailable: {reason}")
  if bias is None:
    bias = jnp.zeros(kernel.shape[-1:], jnp.float32)
  if {x.dtype, kernel.dtype, bias.dtype} != {jnp.dtype(jnp.float32)}:
    raise TypeError(f"conv impl 'onednn' takes float32 inputs, got {x.dtype}, {kernel.dtype} "
                    f"and bias {bias.dtype}")
  if not 1 <= x.ndim - 2 <= 3:
    raise ValueError(f"conv impl 'onednn' takes 1-3 spatial dims, got input shape {x.shape}")
  return _conv(x, kernel, bias, tuple(strides), tuple(tuple(p) for p in padding))


def probe(x: jax.Array) -> jax.Array:
  """x's first element per example, (B,) float32, read by a custom call from x in memory.

  For ordering a hand-written backward pass (`layers.after`): XLA cannot fuse x's producer into
  a custom call, so whatever is tied to the probe waits for x itself. A plain slice of x gets
  fused with x's producer, which then keeps x's inputs alive for that one element. Built with
  the convolution handler: needs `available()`. Takes float32 or bfloat16; no gradient.
  """
  if _setup() is not None:
    raise OnednnUnavailableError(f"probe is unavailable: {_setup()}")
  return jax.ffi.ffi_call(_PROBE_TARGET, jax.ShapeDtypeStruct(x.shape[:1], jnp.float32),
                          vmap_method="sequential")(jax.lax.stop_gradient(x))


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
  return jax.ffi.ffi_call(_MATERIALIZE_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype),
                          input_output_aliases={0: 0}, vmap_method="broadcast_all")(x)


@materialize.defjvp
def _materialize_jvp(primals, tangents):
  return materialize(primals[0]), tangents[0]


def hlo_flops(hlo_text: str) -> float:
  """FLOPs of this module's convolutions in a compiled HLO module's text.

  XLA's cost analysis counts a custom call as zero FLOPs; add this to it. Each pass (forward,
  input gradient, kernel gradient) is 2 * output voxels * kernel volume * Cin * Cout; a call
  inside a loop body is counted once.
  """
  total = 0.0
  for line in hlo_text.splitlines():
    if f'custom_call_target="{_TARGET}"' not in line:
      continue
    attrs = {name: _dense_ints(values, int(n))
             for name, values, n in re.findall(r"(\w+) = dense<([^>]*)> : tensor<(\d+)xi64>", line)}
    total += 2.0 * np.prod(attrs["y_shape"][:-1]) * np.prod(attrs["kernel_shape"])
  return total


def _dense_ints(values: str, n: int) -> list[int]:
  ints = [int(v) for v in re.findall(r"-?\d+", values)]
  return ints * n if len(ints) == 1 else ints  # a splat prints one value


def output_shape(x_shape, kernel_shape, strides, padding) -> tuple[int, ...]:
  spatial = tuple((n + lo + hi - k) // s + 1 for n, k, s, (lo, hi)
                  in zip(x_shape[1:-1], kernel_shape[:-2], strides, padding))
  return (x_shape[0], *spatial, kernel_shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv(x, kernel, bias, strides, padding):
  y_shape = output_shape(x.shape, kernel.shape, strides, padding)
  problem = (x.shape, kernel.shape, y_shape, strides, padding)
  (y,) = _call(_FORWARD, (x, kernel, bias), (y_shape,), *problem)
  return y


def _conv_fwd(x, kernel, bias, strides, padding):
  return _conv(x, kernel, bias, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, res, ct):
  x, kernel = res
  problem = (x.shape, kernel.shape, ct.shape, strides, padding)
  (dx,) = _call(_INPUT_GRAD, (ct, kernel), (x.shape,), *problem)
  dk, dbias = _call(_KERNEL_GRAD, (x, ct), (kernel.shape, kernel.shape[-1:]), *problem)
  return dx, dk, dbias


_conv.defvjp(_conv_fwd, _conv_bwd)


def _call(pass_, operands, out_shapes, x_shape, kernel_shape, y_shape, strides, padding):
  as_attr = lambda v: np.asarray(v, np.int64)  # noqa: E731
  return jax.ffi.ffi_call(_TARGET, [jax.ShapeDtypeStruct(s, jnp.float32) for s in out_shapes],
                          vmap_method="sequential")(
      *operands, pass_=np.int64(pass_), x_shape=as_attr(x_shape),
      kernel_shape=as_attr(kernel_shape), y_shape=as_attr(y_shape), strides=as_attr(strides),
      pad_lo=as_attr([lo for lo, _ in padding]), pad_hi=as_attr([hi for _, hi in padding]))


# ---- Building, loading and registering the handler (once per process). ----

@functools.cache
def _setup() -> str | None:
  """Builds/loads the handler and registers it; returns None, or why the path is unavailable."""
  try:
    library = _onednn_library()
    handler = ctypes.CDLL(str(_build()))
    handler.BldmOnednnLoad.restype = ctypes.c_char_p
    handler.BldmOnednnLoad.argtypes = [ctypes.c_char_p]
    error = handler.BldmOnednnLoad(str(library).encode())
    if error is not None:
      raise OnednnUnavailableError(error.decode())
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(handler.BldmOnednnConvolution),
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
  flags = ["-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-w"]
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
