"""grain input pipelines: subjects -> preprocessed volumes -> per-process batches -> global arrays.

Order of operations (training):
  source (lazy: loads + preprocesses a subject on access)
  -> shuffle(seed) -> repeat (reshuffled each epoch)   same global order on every process
  -> process_rows: each process's contiguous block of every global batch (disjoint shards;
     the global batch is the same ordered batch on any process count)
  -> worker processes (mp_prefetch; element order does not depend on the worker count)
  -> bad-record check (raise DataError naming the file, or skip and count)
  -> batch(per-process share of the global batch) -> sharding.global_batch.
No random transform follows the per-process slice (it would repeat the same randomness on every
process); a future augmentation should seed itself from the record's `index`.

Records: {'image': (X, Y, Z, 1) float32 in [0, 1], 'cond': (n_cov,) float32 (CovariateStats
scaling), 'index': int32 position in the subject list, 'mask': float32, 1 for a real subject, 0 for
eval padding}. Failures inside workers travel as a marker record, never as an exception, so a user
always sees a DataError naming the file instead of a worker traceback (or a hang on unpicklable
exceptions).

Resuming: `loader.get_state()` / `set_state()`; in orbax, store it with
`ocp.args.Composite(data=grain.checkpoint.CheckpointSave(loader))` and restore with
`grain.checkpoint.CheckpointRestore(loader)` (see `checkpoint_args`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import grain
import numpy as np
from absl import flags
from absl import logging

from brain_ldm_jax import sharding
from brain_ldm_jax.data import nifti
from brain_ldm_jax.data.manifest import CovariateStats, Subject
from brain_ldm_jax.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class Preprocess:
  shape: tuple[int, int, int]
  spacing: float
  clip_percentiles: tuple[float, float] | None
  assume_mni: bool = False

  @classmethod
  def from_config(cls, data_config) -> Preprocess:
    clip = data_config.clip_percentiles
    return cls(tuple(int(n) for n in data_config.shape), float(data_config.spacing),
               None if clip is None else (float(clip[0]), float(clip[1])),
               bool(data_config.get("assume_mni", False)))


class SubjectSource:
  """grain random-access source: record i is subject i, loaded and preprocessed on access.

  Indices from len(subjects) up to `length` are padding (zeros, mask 0) for even eval batches.
  """

  def __init__(self, subjects: Sequence[Subject], stats: CovariateStats, preprocess: Preprocess,
               length: int | None = None):
    self._paths = [s.image_path for s in subjects]
    self._cond = np.stack([stats.vector(s) for s in subjects]).astype(np.float32)
    self._preprocess = preprocess
    self._length = len(subjects) if length is None else int(length)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if index >= len(self._paths):
      return self._record(np.zeros(self._preprocess.shape, np.float32), index, mask=0.0)
    path = self._paths[index]
    p = self._preprocess
    try:
      volume, _ = nifti.load_volume(path, p.shape, p.spacing, p.clip_percentiles,
                                    assume_mni=p.assume_mni)
    except DataError as e:
      return {"error": str(e), "index": np.int32(index)}
    except Exception as e:  # pylint: disable=broad-except  (anything else still names the file)
      return {"error": f"{path}: could not be loaded ({type(e).__name__}: {e})",
              "index": np.int32(index)}
    return self._record(volume, index, mask=1.0)

  def _record(self, volume: np.ndarray, index: int, mask: float) -> dict:
    cond = self._cond[index] if index < len(self._paths) else np.zeros_like(self._cond[0])
    return {"image": volume[..., None], "cond": cond, "index": np.int32(index),
            "mask": np.float32(mask)}

  def __repr__(self) -> str:  # grain logs the source; keep it short
    return f"SubjectSource({len(self._paths)} subjects, {self._preprocess})"


class BadRecords:
  """Main-process check of records: raise DataError for a failed load, or skip and count."""

  def __init__(self, skip: bool, preprocess: Preprocess, pad: bool, cond_dim: int,
               num_subjects: int):
    self.skip = skip
    self.cond_dim = cond_dim
    self.num_subjects = num_subjects
    self._skipped_in_a_row = 0
    self.pad = pad  # eval: replace a skipped subject by a masked zero record (equal batch counts)
    self.shape = preprocess.shape
    self.num_skipped = 0

  def keep(self, record: dict) -> bool:
    if "error" not in record or self.pad:
      self._skipped_in_a_row = 0
      return True
    self._skip_or_raise(record)
    # An endless training stream over only bad subjects would otherwise spin forever.
    self._skipped_in_a_row += 1
    if self._skipped_in_a_row >= self.num_subjects:
      raise DataError(f"all {self.num_subjects} subjects of this process failed to load; last: "
                      f"{record['error']}")
    return False

  def fill(self, record: dict) -> dict:
    if "error" not in record:
      return record
    self._skip_or_raise(record)
    return {"image": np.zeros((*self.shape, 1), np.float32),
            "cond": np.zeros((self.cond_dim,), np.float32),
            "index": record["index"], "mask": np.float32(0.0)}

  def _skip_or_raise(self, record: dict) -> None:
    if not self.skip:
      raise DataError(f"{record['error']} (set data.skip_bad_subjects=True to skip such "
                      "subjects)")
    self.num_skipped += 1
    logging.warning("Skipping subject %d: %s", int(record["index"]), record["error"])


def _init_worker(worker_index: int, worker_count: int) -> None:
  """grain workers read absl flags; a spawned worker has not parsed them."""
  del worker_index, worker_count
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _parallel(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  if num_workers <= 0:
    return ds
  if not flags.FLAGS.is_parsed():  # e.g. in tests or notebooks, where absl.app did not run
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                        worker_init_fn=_init_worker)


def _process_shard(shard: grain.sharding.ShardOptions | None) -> tuple[int, int]:
  if shard is None:
    import jax  # pylint: disable=g-import-not-at-top
    return jax.process_index(), jax.process_count()
  return shard.shard_index, shard.shard_count


class Loader:
  """Iterator over batches: dicts of global jax.Arrays (numpy local batches when mesh is None)."""

  def __init__(self, dataset: grain.IterDataset, checker: BadRecords | None, mesh):
    self._iterator = iter(dataset)
    self._checker = checker
    self._mesh = mesh

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._iterator)
    if self._mesh is None:
      return batch
    return {k: sharding.global_batch(np.asarray(v), self._mesh) for k, v in batch.items()}

  @property
  def num_skipped(self) -> int:
    """Bad subjects skipped by this process so far (data.skip_bad_subjects)."""
    return 0 if self._checker is None else self._checker.num_skipped

  # grain.checkpoint.CheckpointHandler stores get_state() bytes per process and calls
  # set_state + start_prefetch on restore.
  def get_state(self) -> bytes:
    return json.dumps(self._iterator.get_state()).encode()

  def set_state(self, state: bytes | str | dict) -> None:
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    self._iterator.set_state(state)

  def start_prefetch(self) -> None:
    start = getattr(self._iterator, "start_prefetch", None)
    if start is not None:
      start()


def checkpoint_args(loader: Loader, restore: bool = False):
  """The orbax args item for a loader: put it in ocp.args.Composite(data=...)."""
  if restore:
    return grain.checkpoint.CheckpointRestore(loader)
  return grain.checkpoint.CheckpointSave(loader)


def _per_process_batch(global_batch_size: int, mesh, process_count: int, field: str) -> int:
  if mesh is not None:
    return sharding.check_global_batch(global_batch_size, mesh, field)
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ConfigError(f"{field}={global_batch_size} does not divide across {process_count} "
                      "processes")
  return global_batch_size // process_count


class _ProcessRow:
  """Element i of one process's stream: row i % local of its block in global batch i // local."""

  def __init__(self, ds: grain.MapDataset, index: int, count: int, local: int):
    self._ds, self._index, self._count, self._local = ds, index, count, local

  def __call__(self, i: int):
    block, row = divmod(int(i), self._local)
    return self._ds[(block * self._count + self._index) * self._local + row]


def process_rows(ds: grain.MapDataset, index: int, count: int, local: int) -> grain.MapDataset:
  """Process `index`'s rows of every global batch of `count * local` consecutive elements.

  Each process takes a contiguous block of each global batch, in order, so the global batch —
  its rows and their order, which pairs rows with per-row random draws — is the same on any
  number of processes.
  """
  if count == 1:
    return ds
  return grain.MapDataset.range(len(ds) // count).map(_ProcessRow(ds, index, count, local))


def make_train_loader(subjects: Sequence[Subject], stats: CovariateStats, data_config,
                      global_batch_size: int, seed: int, mesh=None, *,
                      shard: grain.sharding.ShardOptions | None = None,
                      field: str = "batch_size") -> Loader:
  """Endless shuffled training batches (per-process share of `global_batch_size`).

  `shard` overrides the (jax.process_index, process_count) sharding, e.g. to simulate processes.
  """
  if not subjects:
    raise DataError("the training split is empty")
  index, count = _process_shard(shard)
  local = _per_process_batch(global_batch_size, mesh, count, field)
  preprocess = Preprocess.from_config(data_config)
  checker = BadRecords(bool(data_config.skip_bad_subjects), preprocess, pad=False,
                       cond_dim=len(stats.names), num_subjects=len(subjects))
  ds = grain.MapDataset.source(SubjectSource(subjects, stats, preprocess))
  ds = process_rows(ds.shuffle(seed=int(seed)).repeat(None), index, count, local)
  it = _parallel(ds.to_iter_dataset(), int(data_config.num_workers))
  it = it.filter(checker.keep).batch(local, drop_remainder=True)
  return Loader(it, checker, mesh)


def make_eval_loader(subjects: Sequence[Subject], stats: CovariateStats, data_config,
                     global_batch_size: int, mesh=None, *,
                     shard: grain.sharding.ShardOptions | None = None,
                     field: str = "batch_size") -> Loader:
  """One ordered pass; the subject list is padded to whole global batches with mask-0 records,
  so every process yields the same number of full batches (weight results by 'mask')."""
  if not subjects:
    raise DataError("the evaluation split is empty")
  index, count = _process_shard(shard)
  _per_process_batch(global_batch_size, mesh, count, field)
  local = global_batch_size // count
  padded = -(-len(subjects) // global_batch_size) * global_batch_size
  preprocess = Preprocess.from_config(data_config)
  checker = BadRecords(bool(data_config.skip_bad_subjects), preprocess, pad=True,
                       cond_dim=len(stats.names), num_subjects=len(subjects))
  ds = grain.MapDataset.source(SubjectSource(subjects, stats, preprocess, length=padded))
  # Strided slices keep process p's k-th batch inside global batch k (rows k*G .. (k+1)*G).
  it = _parallel(ds[index::count].to_iter_dataset(), int(data_config.num_workers))
  it = it.map(checker.fill).batch(local, drop_remainder=False)
  return Loader(it, checker, mesh)


class ArraySource:
  """grain source over in-memory records: record i is {name: array[i]} (e.g. cached latents)."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) != 1:
      raise ValueError(f"arrays must have equal lengths; got {lengths}")
    self._arrays = arrays
    self._length = lengths.pop()

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict:
    return {k: v[int(index)] for k, v in self._arrays.items()}

  def __repr__(self) -> str:
    return f"ArraySource({self._length} records: {', '.join(self._arrays)})"


def make_array_loader(arrays: dict[str, np.ndarray], global_batch_size: int, seed: int,
                      mesh=None, *, shard: grain.sharding.ShardOptions | None = None,
                      field: str = "batch_size") -> Loader:
  """Endless shuffled batches of in-memory records, sharded and resumable as the image loader."""
  index, count = _process_shard(shard)
  local = _per_process_batch(global_batch_size, mesh, count, field)
  ds = grain.MapDataset.source(ArraySource(arrays)).shuffle(seed=int(seed)).repeat(None)
  it = process_rows(ds, index, count, local).to_iter_dataset().batch(local, drop_remainder=True)
  return Loader(it, None, mesh)
