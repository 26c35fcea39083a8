"""Scheduling tools for XLA:CPU programs: what to keep in memory, what to compute when.

XLA:CPU fuses an elementwise producer into every consumer and hoists work that depends on
parameters alone to the program's start; on large volumes both keep full-size buffers alive.
`after` ties a computation to a cotangent (so it runs when that exists), `in_memory` computes a
tensor once into memory, `invariant_kernels` marks a loop over fixed parameters, where prepared
kernels may be hoisted. With the oneDNN handlers (`ffi.available()`) they use its custom calls
(`onednn.probe`, `onednn.materialize`); elsewhere they are plain XLA operations.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import contextvars
from typing import Any

import jax
import jax.numpy as jnp

from brain_ldm_jax.cpu import ffi
from brain_ldm_jax.cpu import onednn

_INVARIANT_KERNELS = contextvars.ContextVar("invariant_kernels", default=False)


@contextlib.contextmanager
def invariant_kernels() -> Iterator[None]:
  """Convolutions traced inside prepare their kernels from the kernel alone: for the body of a
  loop that applies a network with fixed parameters (a sampler's `lax.scan`).

  XLA then computes each prepared kernel (transforms, oneDNN's layout) once, before the loop,
  instead of at every step, with the same result to the bit; the price is that all of them stay
  in memory through the loop (benchmarks/benchmark.md, "CPU dispatch thresholds").
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


def kernel_to_prepare(kernel, x):
  """`kernel`, to be transformed for a convolution of x: tied to x, or alone inside
  `invariant_kernels` (then XLA hoists the transform out of the loop)."""
  return kernel if _INVARIANT_KERNELS.get() else after(kernel, x)


def kernels_invariant() -> bool:
  """Whether the function being traced is inside `invariant_kernels`."""
  return _INVARIANT_KERNELS.get()


def onednn_conv(x, kernel, strides, padding, bias=None):
  """`onednn.conv`, its kernel reorder a call of its own inside `invariant_kernels`."""
  return onednn.conv(x, kernel, strides, padding, bias, prepare_kernel=_INVARIANT_KERNELS.get())


@jax.custom_vjp
def cotangent_in_memory(y):
  """y; its cotangent is computed once, into memory (`in_memory`), before its consumers read it."""
  return y


def _cotangent_in_memory_fwd(y):
  return y, None


def _cotangent_in_memory_bwd(_, ct):
  return (in_memory(ct),)


cotangent_in_memory.defvjp(_cotangent_in_memory_fwd, _cotangent_in_memory_bwd)


def in_memory(x: jax.Array) -> jax.Array:
  """x computed once, into memory, on CPU where the custom calls are built (`onednn.materialize`);
  x unchanged elsewhere."""
  if platform(x) == "cpu" and ffi.available():
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
      and ffi.available()):
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


def platform(x) -> str:
  """The platform jit will run x on: its device's, or the default backend's under tracing."""
  # Under jit x is a tracer with no device; the default backend is where jit will run it.
  if isinstance(x, jax.core.Tracer) or not hasattr(x, "devices"):
    return jax.default_backend()
  return next(iter(x.devices())).platform
