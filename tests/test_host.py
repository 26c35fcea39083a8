"""The allocator setting: freed memory is reused without new page faults."""

import os
import subprocess
import sys

import pytest

from brain_ldm_jax.cpu import host

# Allocates, fills and frees 64 MB four times; prints whether the setting took and the minor page
# faults of the last three rounds (glibc unmaps a freed 64 MB block: 16384 4-KiB pages each time).
_ROUNDS = """
import ctypes, resource
from brain_ldm_jax.cpu import host
kept = host.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 64 << 20
def one_round():
  p = libc.malloc(n)
  ctypes.memset(p, 1, n)
  libc.free(p)
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  one_round()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _rounds(**env):
  done = subprocess.run([sys.executable, "-c", _ROUNDS], capture_output=True, text=True,
                        env={**os.environ, **env}, check=True)
  kept, faults = done.stdout.split()
  return kept == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_without_page_faults():
  kept, faults = _rounds()
  assert kept
  assert faults < 1000  # a few pages of Python's own, not 3 x 16384

  kept, faults = _rounds(**{host.OPT_OUT_ENV: "system"})
  assert not kept
  assert faults > 3 * 16384 * 0.9  # glibc's default: every round faults again
