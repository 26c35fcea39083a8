"""The one checkpoint format: an orbax CheckpointManager directory per training stage.

Each step directory holds three items:
  state  the train state pytree (params, optimizer, EMA, step, RNG key), sharded arrays
  data   the grain iterator's state, one file per process, so a resumed run sees the same batches
  meta   JSON: the run config, covariate statistics, latent scale factor, anything else the run needs

Orbax writes a step into a temporary directory and renames it when complete, so a checkpoint that
a crash or `kill -9` interrupted is never listed, and `latest_step()` is always a whole one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from brain_ldm_jax.errors import DataError


class Checkpointer:
  """Saves and restores (state, data iterator, meta) for one stage under `directory`."""

  def __init__(self, directory: str, *, keep: int = 3, asynchronous: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           data=grain.checkpoint.CheckpointHandler(),
                           meta=ocp.JsonCheckpointHandler()))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, data_iterator=None) -> None:
    """Starts saving (asynchronously for arrays); the data state is captured now."""
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> tuple[Any, dict]:
    """(state, meta) at `step`, with arrays laid out as `abstract_state`'s shardings say.

    `data_iterator`, when given, is set to the saved position in place.
    """
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["meta"]

  def restore_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise DataError(f"no finished checkpoint in {self.directory}")
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_state_only(self, abstract_state: Any = None, step: int | None = None) -> Any:
    """The train state at `step` (default latest).

    Without `abstract_state`, arrays land on this process's first device, whatever device layout
    saved them: a run trained on a pod can be loaded in a notebook.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise DataError(f"no finished checkpoint in {self.directory}")
    if abstract_state is None:
      abstract_state = self._single_device_target(step)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def _single_device_target(self, step: int) -> Any:
    metadata = self._manager.item_metadata(step)["state"]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        metadata)

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON under `path` by rename, so readers never see half a file (process 0 only)."""
  if jax.process_index() != 0:
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  logging.debug("wrote %s", path)
