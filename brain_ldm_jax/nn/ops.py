"""The operations whose fastest form depends on the platform: the one seam between the networks
and the CPU kernels (`brain_ldm_jax.cpu`).

    ops.set_backend()                      # once, at the entry point, before anything is traced
    y = ops.conv(x, kernel, bias, strides=(1, 1, 1), padding=((1, 1),) * 3)
    with ops.backend("native"): ...        # tests and benchmarks that compare implementations

The backend is the convolution implementation: "auto" (the default: on CPU oneDNN's kernels and
XLA rewrites picked by shape, the native convolution elsewhere) or one lowering by name
(`BACKENDS`). `set_backend` resolves it before tracing: on CPU it builds and loads the oneDNN
handlers (logged; without a compiler or library the XLA lowerings serve) and sets the process's
allocator for XLA:CPU (`cpu.host`). A function takes the backend in effect when it is traced: a
jitted function keeps the one it was first traced with.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
from typing import Any

import jax
import jax.numpy as jnp

from brain_ldm_jax.cpu import dispatch
from brain_ldm_jax.cpu import ffi
from brain_ldm_jax.cpu import host
from brain_ldm_jax.cpu import lowerings
from brain_ldm_jax.cpu import schedule
from brain_ldm_jax.cpu import upsample
from brain_ldm_jax.errors import ConfigError

BACKENDS = dispatch.IMPLS

_chosen: dict[str, str | None] = {"impl": None}


def set_backend(impl: str = "auto") -> None:
  """Chooses how convolutions are lowered from now on; builds what that needs (see above).

  Call it at the entry point, before any function is traced. Unknown names are a ConfigError.
  """
  if impl not in BACKENDS:
    raise ConfigError(f"convolution backend {impl!r} unknown; choose one of {', '.join(BACKENDS)}")
  host.keep_freed_memory()
  if jax.default_backend() == "cpu":
    ffi.load()
  _chosen["impl"] = impl


def ensure_backend() -> None:
  """`set_backend()` unless a backend is chosen already: for library entry points (`api`)."""
  if _chosen["impl"] is None:
    set_backend()


@contextlib.contextmanager
def backend(impl: str) -> Iterator[None]:
  """`set_backend(impl)` for the functions traced inside; the previous choice afterwards."""
  previous = _chosen["impl"]
  set_backend(impl)
  try:
    yield
  finally:
    _chosen["impl"] = previous


def current_backend() -> str:
  """The backend functions are traced with now ("auto" until one is chosen)."""
  return _chosen["impl"] or "auto"


def conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
         strides: Sequence[int], padding: Sequence[tuple[int, int]],
         dilation: int = 1) -> jax.Array:
  """N-d convolution (+ bias), channels last: x (B, *spatial, Cin), kernel (*k, Cin, Cout),
  bias (Cout,) or None; padding per axis (low, high); the output has x's dtype.

  `dilation` > 1 (stride 1) is computed as "space to batch": d^nd undilated convolutions on the
  d-strided sub-grids of the padded input, interleaved back; exact.
  """
  if dilation == 1:
    return dispatch.conv(x, kernel, bias, strides=strides, padding=padding,
                         impl=current_backend())
  if any(s != 1 for s in strides):
    raise ValueError(f"conv: dilation {dilation} takes stride 1, got {tuple(strides)}")
  return _dilated(x, kernel, bias, dilation, padding)


def _dilated(x, kernel, bias, d, padding):
  nd = x.ndim - 2
  padded = [n + lo + hi for n, (lo, hi) in zip(x.shape[1:-1], padding)]
  out = [p - d * (k - 1) for p, k in zip(padded, kernel.shape[:nd])]
  full = [-(-p // d) * d for p in padded]  # rounded up to a multiple of d
  x = jnp.pad(x, [(0, 0)] + [(lo, hi + f - p) for (lo, hi), p, f in zip(padding, padded, full)]
              + [(0, 0)])
  b, c, m = x.shape[0], x.shape[-1], [f // d for f in full]
  # (B, m0, d, m1, d, ..., C) -> (B, d, d, ..., m0, m1, ..., C) -> (B d^nd, m0, m1, ..., C)
  x = x.reshape(b, *[v for mi in m for v in (mi, d)], c)
  x = x.transpose(0, *range(2, 2 * nd + 1, 2), *range(1, 2 * nd, 2), 2 * nd + 1)
  y = conv(x.reshape(b * d**nd, *m, c), kernel, bias, strides=(1,) * nd,
           padding=((0, 0),) * nd)
  o = y.shape[1:-1]
  y = y.reshape(b, *(d,) * nd, *o, -1)
  y = y.transpose(0, *[a for i in range(nd) for a in (1 + nd + i, 1 + i)], 2 * nd + 1)
  y = y.reshape(b, *(oi * d for oi in o), -1)
  return y[(slice(None), *(slice(0, n) for n in out))]


def upsample2_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
                   padding: Sequence[tuple[int, int]]) -> jax.Array:
  """conv(upsample_nearest2(x), kernel, bias), stride 1 (MONAI's Upsample -> conv), without
  building the upsampled input where the backend can."""
  return upsample.upsample2_conv(x, kernel, bias, padding=padding, impl=current_backend())


def upsample_nearest2(x: jax.Array) -> jax.Array:
  """Nearest-neighbour ×2 upsampling over all spatial axes (torch interpolate, scale 2)."""
  return upsample.upsample_nearest2(x)


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x (B, ..., K) @ kernel (K, N): a dense layer (oneDNN's sgemm for large CPU kernels)."""
  return lowerings.matmul(x, kernel)


def after(tree: Any, ct: Any) -> Any:
  """`tree`, computable only once `ct` exists (same values): orders a hand-written backward
  pass so that nothing is computed before it is needed (`cpu.schedule.after`)."""
  return schedule.after(tree, ct)


def in_memory(x: jax.Array) -> jax.Array:
  """x computed once into memory (a fusion barrier on CPU; x itself elsewhere)."""
  return schedule.in_memory(x)


def invariant_kernels() -> contextlib.AbstractContextManager[None]:
  """For tracing the body of a loop over fixed parameters (a sampler's scan): prepared
  convolution kernels depend on the parameters alone, so XLA hoists them out of the loop
  (`cpu.schedule.invariant_kernels`)."""
  return schedule.invariant_kernels()
