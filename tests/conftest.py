"""Shared test setup: tiny, deterministic, CPU."""

import importlib
import os

import pytest

from brain_ldm_jax.nn import ops

# Parity tests compare against the real torch/monai packages. They fail when those are missing;
# only a developer who sets this variable locally may skip them.
SKIP_PARITY_ENV = "BRAIN_LDM_SKIP_PARITY"


def import_reference(name: str):
  """Import a reference package (torch, monai) for a parity test; fail, never skip, in CI."""
  if os.environ.get(SKIP_PARITY_ENV) == "1":
    pytest.skip(f"{SKIP_PARITY_ENV}=1: parity against {name} skipped on request")
  return importlib.import_module(name)


@pytest.fixture(scope="session", autouse=True)
def conv_backend():
  """The convolution backend chosen once, as the entry points do (`ops.set_backend`): "auto",
  with the oneDNN handlers built before any test traces. Tests that compare implementations
  use `ops.backend(...)`."""
  ops.set_backend()


@pytest.fixture(scope="session", autouse=True)
def subprocess_compilation_cache(tmp_path_factory):
  """XLA's persistent compilation cache for the CLI runs that tests start in subprocesses.

  Many of them run the same programs (same config and device count): each compiles once. On
  several devices the oneDNN convolutions are custom-partitioned, and JAX's cache key holds the
  partitioner's address, different in every process: without it in the key those programs are
  found again. The test process itself has already imported jax, so it is unaffected.
  """
  path = str(tmp_path_factory.mktemp("xla_compilation_cache"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("JAX_COMPILATION_CACHE_DIR", path)
    patch.setenv("JAX_REMOVE_CUSTOM_PARTITIONING_PTR_FROM_CACHE_KEY", "1")
    yield path
