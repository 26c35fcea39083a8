"""Shared test setup: tiny, deterministic, CPU."""

import importlib
import os
import pathlib

# The tests compile far more than they run: XLA:CPU's code generation at LLVM -O0 compiles in
# about 60% of the time, for slower loops. Set before jax starts; the CLI runs that tests start
# in subprocesses inherit it (they add their device count with `xla_flags`).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # yours wins
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from brain_ldm_jax.nn import ops  # pylint: disable=g-import-not-at-top,wrong-import-position


def xla_flags(devices: int) -> str:
  """The tests' XLA_FLAGS with `devices` CPU devices, for a subprocess's environment."""
  return f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"

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


# The modules that take longest start first, so that the workers of `pytest -n` end together
# (measured with --durations; the order only affects speed). The first two run CLI subprocesses
# of the tiny training side by side.
LONGEST_FIRST = ("test_train.py", "test_train_signals.py", "test_train_paths.py",
                 "test_covariate_response.py", "test_counterfactual.py", "test_nn_networks.py",
                 "test_generate.py", "test_checkpoint.py")


def pytest_collection_modifyitems(items):
  """Runs the LONGEST_FIRST modules first (pytest-xdist with `--dist loadfile`, pyproject.toml,
  hands out whole modules, so that their module fixtures, mostly trained runs, are built once)."""
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(pathlib.Path(item.path).name, len(rank)))  # stable
