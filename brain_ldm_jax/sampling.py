"""The one sampling driver: covariate rows in, brains on the host out, over this process's devices.

Every job that samples a run goes through `sample_batches` (or `make_volume_sampler`, which
collects its output): the ldm job's samples and summary stages, evaluate and generate. Each
batch is padded to a fixed size (one compilation; the size a multiple of the device count),
split over the mesh's batch axes with `shard_map`, and sample i uses `fold_in(key, ids[i])`; with
the per-sample program (`api.images_fn`) a sample is then bitwise the same at any batch size or
device count. The next batch is dispatched to the devices before the previous one is brought to
the host, so the host's work on a batch overlaps the devices' work on the next.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from brain_ldm_jax import api
from brain_ldm_jax import sharding as sharding_lib


def local_mesh(mesh_config=None):
  """The mesh over this process's devices: processes sample independently (no collectives).

  Without `mesh_config`, every local device on the batch axis."""
  if mesh_config is None or jax.process_count() > 1:
    # The configured global `data` size does not apply to one process's devices.
    mesh_config = types.SimpleNamespace(data=-1, fsdp=1 if mesh_config is None
                                        else mesh_config.fsdp)
  return sharding_lib.make_mesh(mesh_config, devices=jax.local_devices())


def make_sharded_sampler(run: api.Run, mesh, options: dict) -> Callable:
  """Jitted `(params, key, cond (B, n) normalised, ids (B,)) -> (B, X, Y, Z)` split over `mesh`.

  `options`: sampler, num_steps, eta, guidance_scale (`api.sampling_options`) and optionally
  per_sample_program (default True). `shard_map` gives each device its rows, which it runs as
  `api.images_fn` does; params are replicated.
  """
  fn = api.images_fn(run, sampler=options["sampler"], num_steps=options["num_steps"],
                     eta=options["eta"], guidance_scale=options["guidance_scale"],
                     per_sample=options.get("per_sample_program", True))
  rows = P(sharding_lib.DATA_AXES)
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(), rows, rows), out_specs=rows,
                               check_vma=False))


def batches(ids: Sequence[int], size: int) -> Iterator[tuple[np.ndarray, int]]:
  """(ids padded to `size` by repeating the last, number of real ids) for each batch."""
  for start in range(0, len(ids), size):
    chunk = list(ids[start:start + size])
    real = len(chunk)
    yield np.asarray(chunk + chunk[-1:] * (size - real), np.int32), real


def sample_batches(run: api.Run, normalised: np.ndarray, ids: Sequence[int], *, key: jax.Array,
                   options: dict, batch_size: int, mesh, params=None,
                   sampler_fn: Callable | None = None
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(ids, volumes (k, X, Y, Z) on the host) per batch, in order.

  Sample j has the normalised covariates `normalised[j]` and the noise `fold_in(key, ids[j])`.
  `batch_size` (a multiple of the mesh's batch shards) is the padded size of every call.
  `params` default to the run's. `sampler_fn` may be a prebuilt `make_sharded_sampler` (reused
  by every call of one sampler, and by benchmarks, for one compilation).
  """
  sample = sampler_fn or make_sharded_sampler(run, mesh, options)
  params = jax.device_put(run.params if params is None else params,
                          sharding_lib.replicated(mesh))
  normalised = np.asarray(normalised, np.float32)
  ids = np.asarray(ids, np.int32)

  def dispatch(rows):
    return sample(params, key, sharding_lib.global_batch(normalised[rows], mesh),
                  sharding_lib.global_batch(ids[rows], mesh))

  in_flight = None
  for rows, real in batches(range(len(ids)), batch_size):
    images = dispatch(rows)  # asynchronous: the devices start on it while the host goes on
    if in_flight is not None:
      yield _on_host(*in_flight)
    in_flight = (ids[rows[:real]], images, real)
  if in_flight is not None:
    yield _on_host(*in_flight)


def _on_host(ids: np.ndarray, images, real: int) -> tuple[np.ndarray, np.ndarray]:
  return ids, np.asarray(images)[:real]  # waits for this batch only


def make_volume_sampler(run: api.Run, options: dict, *, batch_size: int = 1,
                        mesh=None) -> Callable:
  """`sample(params, key, cond, *, first_index=0, progress=None) -> (N, X, Y, Z)` on the host.

  `cond` (N, n) or a dict of covariates, in natural units, as `api.make_sampler` takes them;
  sample i uses fold_in(key, first_index + i). Every call runs through one compiled program of
  `batch_size` rows (rounded up to a multiple of the device count) on this process's devices
  (`mesh`, default all of them). `progress(done)` is called after each batch.
  """
  mesh = mesh if mesh is not None else local_mesh()
  shards = sharding_lib.num_batch_shards(mesh)
  batch_size = -(-max(1, int(batch_size)) // shards) * shards
  names = tuple(run.config.data.covariates)
  sharded = make_sharded_sampler(run, mesh, options)
  # The run's weights are placed on the devices once, not at every call (a sweep makes many).
  placed = jax.device_put(run.params, sharding_lib.replicated(mesh))

  def sample(params, key, cond, *, first_index: int = 0,
             progress: Callable[[int], None] | None = None) -> np.ndarray:
    normalised = api.normalise_covariates(api.covariate_matrix(cond, names), run.stats, names)
    ids = range(first_index, first_index + len(normalised))
    out, done = [], 0
    for _, volumes in sample_batches(run, normalised, ids, key=key, options=options,
                                     batch_size=batch_size, mesh=mesh,
                                     params=placed if params is run.params else params,
                                     sampler_fn=sharded):
      out.append(volumes)
      done += len(volumes)
      if progress is not None:
        progress(done)
    return np.concatenate(out)

  return sample
