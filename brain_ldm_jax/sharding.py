"""The one place that builds the device mesh and says how arrays are laid out on it.

Batches are split over the `data` and `fsdp` axes together (every device gets distinct examples);
large parameters and their optimizer state are split over `fsdp` along their largest divisible
dimension; everything else is replicated.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from brain_ldm_jax.errors import ConfigError

DATA_AXES = ("data", "fsdp")


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A ("data", "fsdp") mesh over all devices; `mesh_config.data == -1` takes what fsdp leaves."""
  devices = list(jax.devices() if devices is None else devices)
  fsdp = int(mesh_config.fsdp)
  data = int(mesh_config.data)
  if fsdp < 1 or len(devices) % fsdp:
    raise ConfigError(f"mesh.fsdp={fsdp} must be >= 1 and divide the {len(devices)} devices")
  if data == -1:
    data = len(devices) // fsdp
  if data * fsdp != len(devices):
    raise ConfigError(f"mesh.data={data} x mesh.fsdp={fsdp} must equal the {len(devices)} devices "
                      "(use mesh.data=-1 to take all that fsdp leaves)")
  return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in DATA_AXES)


def check_global_batch(batch_size: int, mesh: Mesh, field: str) -> int:
  """The per-process share of a global batch; a clear error when it does not divide."""
  shards = num_batch_shards(mesh)
  if batch_size % shards:
    raise ConfigError(f"{field}={batch_size} does not divide across {shards} devices; "
                      f"use a multiple of {shards}")
  if batch_size % jax.process_count():
    raise ConfigError(f"{field}={batch_size} does not divide across {jax.process_count()} processes")
  return batch_size // jax.process_count()


def param_spec(shape: tuple[int, ...], mesh: Mesh, min_size: int) -> P:
  """Shard a large array over `fsdp` along its largest dimension that divides evenly."""
  fsdp = mesh.shape["fsdp"]
  if fsdp == 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def param_shardings(tree, mesh: Mesh, min_size: int):
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) by `param_spec`."""
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, mesh, min_size)), tree)


def global_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
  """This process's rows of a batch -> one global array split over the mesh's batch axes."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local)
