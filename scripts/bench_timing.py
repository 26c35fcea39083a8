"""Timing and flop counts for scripts/benchmark.py's cases: each row's time beside a GEMM's.

Imports jax: scripts/benchmark.py imports this module once the thread count is set.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from bench_monai import torch_sync
import harness
from brain_ldm_jax.cpu import onednn

# The peak's matmul size; scripts/benchmark_gpu.py sets a larger one for a GPU (the report reads
# it as bench_timing.GEMM_N, so that it sees the setting).
GEMM_N = 2048


def interleaved(fns: dict, repeats: int, warmup: bool = True) -> harness.Timings:
  """`harness.interleaved`, waiting for MONAI's queued GPU work after each call."""
  return harness.interleaved(fns, repeats, warmup=warmup, sync=torch_sync)


def gemm_fn():
  a = jax.random.normal(jax.random.key(0), (GEMM_N, GEMM_N), jnp.float32)
  mm = jax.jit(lambda a: a @ a).lower(a).compile()
  return lambda: mm(a).block_until_ready()


def gemm_gflops(seconds: float) -> float:
  return 2 * GEMM_N**3 / seconds / 1e9


def compile_aot(fn, *args):
  """(compiled executable, XLA flop count, seconds to compile) of a jitted fn for `args`."""
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  return compiled, xla_flops(compiled, lowered), seconds


def xla_flops(compiled, lowered) -> float:
  """XLA's cost-analysis flops of a program, convolutions included.

  XLA counts custom calls as zero: on CPU our oneDNN convolutions (added from the HLO), on GPU
  the cuDNN calls its compiler turns every convolution into, so there the count comes from the
  program before optimisation, where they are still convolution ops.
  """
  if jax.default_backend() != "cpu":
    return _flops(lowered.cost_analysis())
  return _flops(compiled.cost_analysis()) + onednn.hlo_flops(compiled.as_text())


def _flops(cost) -> float:
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))
