"""The host process's memory allocator, set up for XLA:CPU's large per-call buffers.

XLA:CPU takes every compiled call's temporary buffer and outputs from malloc and frees them when
the call ends. glibc serves blocks of 32 MB and more (and smaller ones until its adaptive
threshold has grown) with fresh pages from the kernel and unmaps them on free, so each call of a
training step page-faults and zeroes its whole working memory again (benchmarks/benchmark.md,
"CPU dispatch thresholds", keep_freed_memory). `keep_freed_memory` makes freed blocks stay in the
process for the next call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER = -1  # as M_TRIM_THRESHOLD: trimming disabled (mallopt(3))

OPT_OUT_ENV = "BRAIN_LDM_MALLOC"


@functools.cache
def keep_freed_memory() -> bool:
  """Serves every malloc from the heap and never gives its free top back to the kernel (glibc).

  The process's resident memory then stays at its high-water mark, which is what the next
  training step or sampling call needs again anyway. Set BRAIN_LDM_MALLOC=system to keep glibc's
  defaults. Returns whether the setting is in effect (False off glibc, or opted out). Affects the
  whole process, every library in it; `nn.ops.set_backend` calls it on CPU.
  """
  if os.environ.get(OPT_OUT_ENV, "").lower() == "system":
    return False
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):
    return False  # not glibc (musl, macOS): nothing to set
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _NEVER) == 1
  if not ok:
    logging.warning("brain_ldm_jax: mallopt refused the allocator settings; glibc's defaults stay")
  return ok
