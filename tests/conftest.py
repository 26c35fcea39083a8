"""Shared test setup: tiny, deterministic, CPU."""

import importlib
import os

import pytest

# Parity tests compare against the real torch/monai packages. They fail when those are missing;
# only a developer who sets this variable locally may skip them.
SKIP_PARITY_ENV = "BRAIN_LDM_SKIP_PARITY"


def import_reference(name: str):
  """Import a reference package (torch, monai) for a parity test; fail, never skip, in CI."""
  if os.environ.get(SKIP_PARITY_ENV) == "1":
    pytest.skip(f"{SKIP_PARITY_ENV}=1: parity against {name} skipped on request")
  return importlib.import_module(name)
