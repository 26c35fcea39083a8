"""The one checkpoint format: an orbax CheckpointManager directory per training stage.

Each step directory holds three items:
  state  the train state pytree (params, optimizer, EMA, step, RNG key), sharded arrays
  data   the grain iterator's state, one file per process, so a resumed run sees the same batches
  meta   JSON: the run config, covariate statistics, latent scale factor, anything else the run needs

Orbax writes a step into a temporary directory and renames it when complete, so a checkpoint that
a crash or `kill -9` interrupted is never listed, and `latest_step()` is always a whole one.

Integrity: every save records a SHA-256 digest of each array of the state (of each saved shard,
keyed by its tree path and index) in the step's own orbax metadata (`custom_metadata`), which
orbax commits together with the arrays. Every restore recomputes the digests from the values it
returns and compares them, so a truncated, overwritten or bit-flipped file is noticed whether
TensorStore raises or silently decodes other values. A step whose restore raises, whose values
differ from their digests, or that has no digests is damaged; `restore_newest_intact` walks the
steps from the newest, warns about each damaged one and returns the newest intact one.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from brain_ldm_jax import multihost
from brain_ldm_jax.errors import DataError

DIGESTS_KEY = "array_sha256"
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"  # orbax's, in each step directory
SET_ASIDE_DIR = "damaged"


class CheckpointDamaged(DataError):
  """A step that cannot be restored or whose restored values differ from their digests."""

  def __init__(self, directory: str, step: int, what: str):
    self.step, self.what = step, what
    super().__init__(f"{os.path.basename(directory)}: checkpoint step {step} in {directory} is "
                     f"damaged ({what})")


class Checkpointer:
  """Saves and restores (state, data iterator, meta) for one stage under `directory`."""

  def __init__(self, directory: str, *, keep: int = 3, asynchronous: bool = True):
    self.directory = os.path.abspath(directory)
    self._keep, self._asynchronous = keep, asynchronous
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self._keep, create=True, enable_async_checkpointing=self._asynchronous)
    return ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           data=grain.checkpoint.CheckpointHandler(),
                           meta=ocp.JsonCheckpointHandler()))

  def _reopen(self) -> None:
    # A restore that failed part-way leaves orbax's reads cancelled mid-flight: the next save or
    # restore goes through a fresh manager rather than one in an unknown state.
    try:
      self._manager.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.debug("closing the checkpoint manager after a failed restore: %s", e)
    self._manager = self._open()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, data_iterator=None) -> None:
    """Starts saving (asynchronously for arrays); the data state and the digests are taken now."""
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    digests = gather_digests(array_digests(state))
    self._manager.save(step, args=ocp.args.Composite(**items), force=True,
                       custom_metadata={DIGESTS_KEY: digests})

  # Restoring: every path goes through `_verified`.

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> tuple[Any, dict]:
    """(state, meta) at `step`, verified, with arrays laid out as `abstract_state`'s shardings say.

    `data_iterator`, when given, is set to the saved position in place. Raises CheckpointDamaged.
    """
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)

    def restore():
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      return restored["state"], restored["meta"]

    return self._verified(step, restore, lambda restored: restored[0])

  def restore_state_only(self, abstract_state: Any = None, step: int | None = None) -> Any:
    """The verified train state at `step` (default: the newest intact step).

    Without `abstract_state`, arrays land on this process's first device, whatever device layout
    saved them: a run trained on a pod can be loaded in a notebook.
    """
    def at(s):
      def restore():
        target = self._single_device_target(s) if abstract_state is None else abstract_state
        return self._manager.restore(
            s, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
      return self._verified(s, restore, lambda state: state)

    return at(step) if step is not None else self._newest_intact(at)[1]

  def restore_subtree(self, key: str, step: int | None = None) -> tuple[int, Any]:
    """(step, the state's `key` subtree) on this process's first device, verified.

    Only that subtree is read (e.g. the EMA parameters, not the optimizer moments). At `step`, or
    the newest intact step (warning about newer damaged ones).
    """
    def at(s):
      def restore():
        target = {key: self._single_device_target(s)[key]}
        path = os.path.join(self.directory, str(s), "state")
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
          return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
              item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True))
      return self._verified(s, restore, lambda tree: {key: tree[key]})[key]

    return (step, at(step)) if step is not None else self._newest_intact(at)

  def restore_newest_intact(self, abstract_state: Any, data_iterator=None, *,
                            set_aside: bool = False) -> tuple[int, Any] | None:
    """(step, state) of the newest intact step, None when there are no steps.

    Each damaged newer step is named in a warning; with `set_aside` (a job that will save those
    steps again) they are moved to `directory/damaged/`, never deleted.
    """
    if not self.all_steps():
      return None
    step, (state, _), damaged = self._newest_intact(
        lambda s: self.restore(s, abstract_state, data_iterator), with_damaged=True)
    if set_aside and damaged:
      self._set_aside(damaged)
    return step, state

  def _verified(self, step: int, restore: Callable[[], Any], state_of: Callable[[Any], Any]):
    """restore(), checked against `step`'s digests; any failure is CheckpointDamaged."""
    if step not in self.all_steps():
      raise DataError(f"no checkpoint step {step} in {self.directory} (it has steps "
                      f"{', '.join(map(str, self.all_steps())) or 'none'})")
    failure, problem = None, None
    try:
      restored = restore()
      expected = self._digests(step)
      if expected is None:
        raise ValueError("no array digests in the step metadata (damaged, or written by an "
                         "older version)")
      problem = verify_digests(state_of(restored), expected)
    except Exception as e:  # pylint: disable=broad-except
      # TensorStore, orbax and JSON raise many types for damaged files (ValueError, RuntimeError,
      # UnicodeDecodeError, ...); all of them mean this step cannot be used.
      failure, problem = e, _one_line(e)
    if not agree(problem is None):
      self._reopen()
      raise CheckpointDamaged(self.directory, step,
                              problem or "damaged on another process") from failure
    return restored

  def _digests(self, step: int) -> dict | None:
    # The step metadata file orbax committed with the arrays; read directly, since orbax's reader
    # turns an unreadable file into empty metadata (and also reads every item's tree metadata).
    path = os.path.join(self.directory, str(step), STEP_METADATA_FILE)
    with open(path, encoding="utf-8") as f:
      return (json.load(f).get("custom_metadata") or {}).get(DIGESTS_KEY)

  def _newest_intact(self, restore_at: Callable[[int], Any], with_damaged: bool = False):
    """(step, restore_at(step)) for the newest step that restores, warning about newer ones."""
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        restored = restore_at(step)
      except CheckpointDamaged as e:
        damaged.append(e)
        continue
      for e in damaged:
        logging.warning("%s; falling back to step %d", e, step)
      steps = [e.step for e in damaged]
      return (step, restored, steps) if with_damaged else (step, restored)
    if not damaged:
      raise DataError(f"no finished checkpoint in {self.directory}")
    raise DataError(f"no intact checkpoint in {self.directory}: "
                    + "; ".join(f"step {e.step}: {e.what}" for e in damaged))

  def _set_aside(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      aside = os.path.join(self.directory, SET_ASIDE_DIR)
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(os.path.join(self.directory, str(step)), target)
        logging.warning("%s: moved the damaged step %d to %s", os.path.basename(self.directory),
                        step, target)
    multihost.barrier("checkpoint_set_aside")
    self._manager.reload()

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


# Digests: {tree path: {"dtype", "shape", "shards": [[index, sha256], ...]}}, where `index` is
# [[start, stop], ...] per dimension. A shard is hashed as its C-order bytes, so any layout that
# restores the same values reproduces the same digests.


def array_digests(tree: Any) -> dict:
  """Digests of the shards of `tree` that this process saves (each shard once, globally)."""
  def record(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      shards = [(_index(s.index, leaf.shape), np.asarray(s.data))
                for s in leaf.addressable_shards if s.replica_id == 0]
    else:
      value = np.asarray(leaf)
      shards = [(_index((), value.shape), value)] if jax.process_index() == 0 else []
    return dict(dtype=_dtype_name(leaf), shape=list(np.shape(leaf)),
                shards=[[index, _sha256(data)] for index, data in shards])

  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  records = _parallel_map(record, [leaf for _, leaf in leaves])
  return {_path_name(path): r for (path, _), r in zip(leaves, records)}


def gather_digests(local: dict) -> dict:
  """Every process's digests merged (on every process): the primary writes the step metadata."""
  if jax.process_count() == 1:
    return local
  payload = np.frombuffer(json.dumps(local).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.int64(payload.size))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:payload.size] = payload
  merged = {}
  for size, row in zip(sizes, multihost_utils.process_allgather(padded)):
    for name, record in json.loads(bytes(row[:int(size)]).decode()).items():
      merged.setdefault(name, dict(record, shards=[]))["shards"] += record["shards"]
  return merged


def verify_digests(tree: Any, expected: dict) -> str | None:
  """What differs between `tree`'s values and their saved digests (None: all match).

  Checks every leaf of `tree` (a whole state, or a subtree of it); in several processes, each
  checks the saved shards that lie inside its own addressable shards.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  problems = _parallel_map(lambda item: _leaf_problem(_path_name(item[0]), item[1], expected),
                           leaves)
  return next((p for p in problems if p is not None), None)


def _leaf_problem(name: str, leaf, expected: dict) -> str | None:
  record = expected.get(name)
  if record is None:
    return f"no digest for {name}"
  if (_dtype_name(leaf), list(np.shape(leaf))) != (record["dtype"], record["shape"]):
    return (f"{name} is {_dtype_name(leaf)}{list(np.shape(leaf))}, saved as "
            f"{record['dtype']}{record['shape']}")
  covered = sum(int(np.prod([b - a for a, b in index])) for index, _ in record["shards"])
  if covered != int(np.prod(record["shape"])):
    return f"the digests of {name} cover {covered} of its {int(np.prod(record['shape']))} values"
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    parts = [(_index(s.index, leaf.shape), s.data) for s in leaf.addressable_shards]
  else:
    parts = [(_index((), np.shape(leaf)), np.asarray(leaf))]
  for index, digest in record["shards"]:
    for part_index, data in parts:
      if _inside(index, part_index):
        local = tuple(slice(a - p, b - p) for (a, b), (p, _) in zip(index, part_index))
        if _sha256(np.asarray(data)[local]) != digest:
          part = "" if len(record["shards"]) == 1 else _index_text(index)
          return f"{name}{part} differs from its digest"
        break
  return None


def _parallel_map(fn: Callable, items: list) -> list:
  # hashlib releases the GIL on large buffers, so the leaves hash on all cores at once.
  with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    return list(pool.map(fn, items))


def agree(ok: bool) -> bool:
  """True when `ok` holds on every process, so all of them fall back to the same step."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _dtype_name(leaf) -> str:
  dtype = getattr(leaf, "dtype", None)
  return np.dtype(np.asarray(leaf).dtype if dtype is None else dtype).name


def _sha256(value: np.ndarray) -> str:
  # ascontiguousarray: C-order bytes whatever the slice; uint8 view: any dtype (bfloat16, keys).
  return hashlib.sha256(np.ascontiguousarray(value).view(np.uint8).reshape(-1)).hexdigest()


def _index(index: tuple, shape: tuple) -> list[list[int]]:
  """A shard's index (slices; () for the whole array) as [[start, stop], ...] per dimension."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  return [list(s.indices(n)[:2]) for s, n in zip(index, shape)]


def _inside(index, outer) -> bool:
  return all(p <= a and b <= q for (a, b), (p, q) in zip(index, outer))


def _index_text(index) -> str:
  return "[" + ", ".join(f"{a}:{b}" for a, b in index) + "]" if index else ""


def _path_name(path) -> str:
  """'params/conv_in/kernel': the same for a state dataclass and for its restored dict form."""
  parts = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
  return "/".join(parts)


def _one_line(e: BaseException) -> str:
  """The innermost cause's first line: orbax wraps TensorStore's message in its own."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = str(e).strip()
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a repr()'d message
    text = text[1:-1]
  text = text.splitlines()
  return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__
