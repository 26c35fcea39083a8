"""How a convolution becomes XLA operations: the one swappable place for conv lowering.

Every convolution in the networks goes through `conv`. On GPU/TPU the native convolution is the
fast path (cuDNN / the TPU convolution unit); on CPU, exact rewrites of a 3D convolution can beat
XLA's native one (see DESIGN.md §5), so `impl="auto"` picks per backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax import lax

IMPLS = ("auto", "native")


def conv(x: jax.Array, kernel: jax.Array, *, strides: Sequence[int],
         padding: Sequence[tuple[int, int]], impl: str = "auto") -> jax.Array:
  """N-d convolution, channels last: x (B, *spatial, Cin), kernel (*k, Cin, Cout)."""
  if impl not in IMPLS:
    raise ValueError(f"conv impl {impl!r} unknown; choose one of {IMPLS}")
  return _native(x, kernel, strides, padding)


def _native(x, kernel, strides, padding):
  nd = x.ndim - 2
  spatial = "".join("DHW"[-nd:]) if nd <= 3 else None
  dn = lax.conv_dimension_numbers(x.shape, kernel.shape,
                                  (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
  return lax.conv_general_dilated(x, kernel, window_strides=tuple(strides),
                                  padding=tuple(tuple(p) for p in padding),
                                  dimension_numbers=dn)
