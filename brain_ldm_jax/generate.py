r"""A synthetic BIDS dataset of N brains from a trained run: what the `generate` job does.

    python -m brain_ldm_jax.main --config=configs/generate.py --workdir=OUT \
        --config.generate.run_dir=RUN --config.generate.num_subjects=1000

The output is a BIDS derivative (layout, tables and check: bids.py); the job is jobs/generate.py.

Determinism: subject i's noise is fold_in(key(seed), i), and with `per_sample_program` (default)
every subject runs through the same batch-1 XLA program (`api.images_fn`, driven by sampling.py),
so subject i is the bitwise same image whatever the batch size, device count, process count or
number of restarts (measured on CPU; a batched program differs by ~4e-6 between batch 1 and 4,
which quantised output would not hide either: values near a rounding boundary would still flip).
On GPUs, XLA's convolution autotuning may pick other algorithms in another process; set
XLA_FLAGS=--xla_gpu_deterministic_ops=true (and the same GPU model) for bitwise repeatability.

Work split: process p takes subjects p, p + P, p + 2P, ... (P processes) and samples them on its
own devices, the batch split over the mesh's batch axes with `shard_map`; nothing is exchanged
between processes until the final barrier, after which process 0 writes the tables (from the
plan, so host-local output disks work too). Each process writes only its own subjects' files.

Files are written under a temporary name (`.tmp-*`) in their final folder and renamed, the
sidecar after the image; a subject is finished when its image exists and its sidecar holds exactly
the bytes this run would write. A rerun after a kill skips finished subjects, removes stale
temporaries, redoes the rest and rebuilds the tables; the result is byte-identical to an
uninterrupted run. Sampling overlaps writing: the next batch is dispatched to the devices before
the previous one is handed to a pool of writer threads (gzip releases the GIL), and the main
thread only waits when the bounded write queue is full.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import os
import threading
import time
from typing import Callable

import jax
import numpy as np
from absl import logging

from brain_ldm_jax import api
from brain_ldm_jax import bids
from brain_ldm_jax import covariates as covariates_lib
from brain_ldm_jax import files
from brain_ldm_jax import multihost
from brain_ldm_jax import networks
from brain_ldm_jax import sampling
from brain_ldm_jax import sharding as sharding_lib
from brain_ldm_jax.diffusion import samplers
from brain_ldm_jax.errors import ConfigError, DataError

OUTPUT_DTYPES = ("float32", "int16")


# ----------------------------------------------------------------------------------------------
# Settings and the plan


@dataclasses.dataclass(frozen=True)
class Settings:
  """The validated `config.generate` section."""
  run_dir: str
  out_dir: str
  num_subjects: int
  covariates_tsv: str
  stratify: bool
  age_bins: int
  seed: int
  batch_size: int
  sampler: str | None
  num_steps: int | None
  eta: float | None
  guidance_scale: float | None
  per_sample_program: bool
  output_dtype: str
  writer_threads: int
  max_pending_subjects: int
  progress_every_s: float
  overwrite: bool


def settings_from_config(config, workdir: str) -> Settings:
  g = config.generate
  if not g.run_dir:
    raise ConfigError("generate.run_dir is empty: set --config.generate.run_dir to the workdir "
                      "of a trained run (the one holding run.json)")
  if g.output_dtype not in OUTPUT_DTYPES:
    raise ConfigError(f"generate.output_dtype={g.output_dtype!r}: use one of "
                      f"{', '.join(OUTPUT_DTYPES)}")
  for field in ("batch_size", "writer_threads"):
    if int(g[field]) < 1:
      raise ConfigError(f"generate.{field}={g[field]} must be >= 1")
  if int(g.num_subjects) < 0:
    raise ConfigError(f"generate.num_subjects={g.num_subjects} must be >= 0")
  if g.stratify and g.covariates_tsv:
    raise ConfigError("generate.stratify balances drawn covariates; it cannot be combined with "
                      "generate.covariates_tsv (stratify the table yourself)")
  return Settings(
      run_dir=os.path.abspath(g.run_dir), out_dir=os.path.abspath(g.out_dir or workdir),
      num_subjects=int(g.num_subjects), covariates_tsv=g.covariates_tsv,
      stratify=bool(g.stratify), age_bins=int(g.age_bins), seed=int(g.seed),
      batch_size=int(g.batch_size), sampler=g.sampler or None, num_steps=g.num_steps or None,
      eta=g.eta, guidance_scale=g.guidance_scale,
      per_sample_program=bool(g.per_sample_program), output_dtype=g.output_dtype,
      writer_threads=int(g.writer_threads), max_pending_subjects=int(g.max_pending_subjects),
      progress_every_s=float(g.progress_every_s), overwrite=bool(g.overwrite))


def timestep_spacing(config, sampler: str) -> str:
  """The spacing the sampler will use: the run's, or (when empty) the sampler's own default."""
  if config.sampling.get("timestep_spacing", ""):
    return config.sampling.timestep_spacing
  fn = getattr(samplers, f"{sampler}_sample")
  return inspect.signature(fn).parameters["timestep_spacing"].default


def make_plan(run: api.Run, s: Settings) -> bids.Plan:
  names = tuple(run.config.data.covariates)
  options = api.sampling_options(run, sampler=s.sampler, num_steps=s.num_steps, eta=s.eta,
                                 guidance_scale=s.guidance_scale)
  source_ids = None
  if s.covariates_tsv:
    covariates, ids = covariates_lib.read_covariates_tsv(s.covariates_tsv, names)
    if s.num_subjects > len(covariates):
      raise ConfigError(f"generate.num_subjects={s.num_subjects} but {s.covariates_tsv} has "
                        f"only {len(covariates)} rows (0 takes them all)")
    num = s.num_subjects or len(covariates)
    covariates = covariates[:num]
    source_ids = None if ids is None else tuple(ids[:num])
    source = f"covariates requested in {os.path.abspath(s.covariates_tsv)}"
  else:
    if s.num_subjects < 1:
      raise ConfigError("generate.num_subjects is 0: set how many subjects to generate, or give "
                        "generate.covariates_tsv")
    table = covariates_lib.cohort_table_path(run)
    cohort = None
    if table is not None:
      cohort, _ = covariates_lib.read_covariates_tsv(table, names)
      source = (f"rows of the training cohort's table {table} resampled with replacement "
                "(its joint distribution of the covariates)")
    else:
      source = ("drawn independently and uniformly within the run's training min/max of each "
                "covariate (the training cohort's participants.tsv was not found), sex as a "
                "fair coin")
    covariates = covariates_lib.draw_covariates(s.num_subjects, s.seed, run.stats, cohort,
                                 stratify=s.stratify, age_bins=s.age_bins)
    if s.stratify:
      edges = covariates_lib.age_bin_edges(run.stats, s.age_bins)
      source += (f"; stratified by sex x {s.age_bins} age bins with edges "
                 f"{[round(float(e), 3) for e in edges]}, subject i in stratum "
                 f"i mod {2 * s.age_bins}")
  api.normalise_covariates(covariates, run.stats, names)  # warns when extrapolating
  sampling = dict(options, timestep_spacing=timestep_spacing(run.config, options["sampler"]),
                  per_sample_program=s.per_sample_program)
  model = {"RunDirectory": run.checkpoint, "Preset": run.config.get("preset", ""),
           "ScaleFactor": run.scale_factor, "Weights": "UNet EMA + autoencoder, latest "
                                                      "checkpoints"}
  return bids.Plan(names=names, covariates=np.asarray(covariates, np.float64),
              source_ids=source_ids, source=source, model=model, sampling=sampling,
              seed=s.seed, output_dtype=s.output_dtype)


def check_or_write_plan(plan: bids.Plan, out_dir: str, overwrite: bool) -> None:
  """Refuses to mix two different datasets in one folder; process 0 records the plan.

  Every process reads the existing plan before any writes it (a barrier in between), so all
  reach the same verdict.
  """
  path = os.path.join(out_dir, bids.PLAN_FILE)
  text = files.json_text(plan.to_json())
  if os.path.exists(path) and not overwrite:
    with open(path, encoding="utf-8") as f:
      previous = f.read()
    if previous != text:
      raise ConfigError(f"{out_dir} holds a dataset made with other settings, covariates or "
                        f"software ({path} differs); use another --workdir / "
                        "generate.out_dir, or --config.generate.overwrite=True to replace it")
  multihost.barrier("generate_plan_checked")
  if jax.process_index() == 0:
    with files.disk_errors(out_dir):
      files.write_text_atomic(path, text)
  multihost.barrier("generate_plan_written")


# ----------------------------------------------------------------------------------------------
# Loading and checking the run


def load_checked_run(run_dir: str) -> api.Run:
  """`api.load_run` with clear errors, and weights checked against the run's networks."""
  if not os.path.isdir(run_dir):
    raise DataError(f"generate.run_dir={run_dir} does not exist; give the workdir of a trained "
                    "run")
  try:
    run = api.load_run(run_dir)
  except (DataError, ConfigError):
    raise
  except Exception as e:  # orbax raises many types for missing / foreign checkpoints
    raise DataError(f"{run_dir}: cannot restore the checkpoints ({type(e).__name__}: {e}); is "
                    "it a finished run of this version?") from e
  problems = param_mismatches(run)
  if problems:
    raise DataError(f"{run_dir}: the checkpoint does not fit the networks in its run.json "
                    f"(first of {len(problems)}: {'; '.join(problems[:3])}); was it trained with "
                    "another config or version?")
  return run


def param_mismatches(run: api.Run) -> list[str]:
  """Differences in names and shapes between the checkpoint and the run's networks."""
  want = {jax.tree_util.keystr(p): x.shape
          for p, x in jax.tree_util.tree_leaves_with_path(networks.param_shapes(run.config))}
  have = {jax.tree_util.keystr(p): np.shape(x)
          for p, x in jax.tree_util.tree_leaves_with_path(run.params)}
  problems = [f"{k} missing" for k in sorted(set(want) - set(have))]
  problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
  problems += [f"{k} has shape {have[k]}, the network wants {want[k]}"
               for k in sorted(set(want) & set(have)) if tuple(have[k]) != tuple(want[k])]
  return problems


# ----------------------------------------------------------------------------------------------
# Sampling on this process's devices


def process_share(num_subjects: int, process: int, processes: int) -> list[int]:
  """Subject indices of one process: every P-th, so shares differ by at most one."""
  return list(range(process, num_subjects, processes))


# ----------------------------------------------------------------------------------------------
# Writing


class Writer:
  """A bounded queue of subjects to write on `threads` threads; errors surface in `check`."""

  def __init__(self, threads: int, max_pending: int):
    self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="nifti")
    self._slots = threading.BoundedSemaphore(max_pending)
    self._futures: list[concurrent.futures.Future] = []
    self.written = 0
    self.wait_s = 0.0  # time the caller spent waiting for a free slot (disk slower than device)

  def submit(self, fn: Callable, *args) -> None:
    start = time.monotonic()
    self._slots.acquire()
    self.wait_s += time.monotonic() - start
    self.check()
    future = self._pool.submit(fn, *args)
    future.add_done_callback(lambda _: self._slots.release())
    self._futures.append(future)

  def check(self) -> None:
    """Raises the first write error; counts finished writes."""
    pending = []
    for future in self._futures:
      if not future.done():
        pending.append(future)
        continue
      future.result()
      self.written += 1
    self._futures = pending

  def close(self, cancel: bool = False) -> None:
    self._pool.shutdown(wait=True, cancel_futures=cancel)
    if not cancel:
      self.check()


@dataclasses.dataclass
class Summary:
  """What one process did; times in seconds from its first dispatch."""
  num_subjects: int  # in the whole dataset
  assigned: int  # to this process
  skipped: int  # already finished
  generated: int = 0
  wall_s: float = 0.0  # until the last file is written
  first_batch_s: float = 0.0  # until the first batch is sampled (includes compilation)
  first_batch_subjects: int = 0
  writer_wait_s: float = 0.0  # waiting for a free slot in the write queue

  @property
  def steady_s_per_subject(self) -> float:
    """Seconds per subject after the first batch (compilation excluded)."""
    rest = self.generated - self.first_batch_subjects
    return (self.wall_s - self.first_batch_s) / rest if rest > 0 else float("nan")


def generate_subjects(run: api.Run, plan: bids.Plan, out_dir: str, *, mesh, batch_size: int,
                      writer_threads: int = 2, max_pending_subjects: int = 0,
                      overwrite: bool = False, progress_every_s: float = 10.0,
                      sampler_fn: Callable | None = None) -> Summary:
  """Samples and writes this process's unfinished subjects; returns counts and timings.

  `batch_size` is global; this process runs batch_size / process_count rows per call, split over
  `mesh`'s batch axes (sampling.sample_batches). `sampler_fn` may be a prebuilt
  `sampling.make_sharded_sampler` (benchmarks reuse its compilation).
  """
  processes, process = jax.process_count(), jax.process_index()
  if batch_size % processes:
    raise ConfigError(f"generate.batch_size={batch_size} does not divide across {processes} "
                      "processes")
  local_batch = batch_size // processes
  shards = sharding_lib.num_batch_shards(mesh)
  if local_batch % shards:
    raise ConfigError(f"generate.batch_size={batch_size} gives {local_batch} per process, which "
                      f"does not divide across its {shards} devices; use a multiple of "
                      f"{shards * processes}")
  mine = process_share(plan.num_subjects, process, processes)
  sidecars = {i: files.json_text(plan.sidecar(i)) for i in mine}
  labels = {i: bids.subject_label(i) for i in mine}
  for i in mine:  # stale temporaries of a killed run, in this process's folders only
    files.remove_temporaries(os.path.dirname(bids.image_path(out_dir, labels[i])))
  todo = [i for i in mine
          if overwrite or not bids.subject_is_finished(out_dir, labels[i], sidecars[i])]
  logging.info("process %d: %d of %d subjects assigned, %d already finished, %d to generate "
               "(batch %d on %d device(s))", process, len(mine), plan.num_subjects,
               len(mine) - len(todo), len(todo), local_batch, shards)
  summary = Summary(plan.num_subjects, len(mine), len(mine) - len(todo))
  if not todo:
    return summary

  affine = np.asarray(run.affine)
  writer = Writer(writer_threads, max_pending_subjects or 2 * local_batch)
  sampled = 0
  loop_start = last_log = time.monotonic()
  try:
    for ids, volumes in sampling.sample_batches(
        run, run.stats.normalise(plan.covariates[todo]), todo, key=jax.random.key(plan.seed),
        options=plan.sampling, batch_size=local_batch, mesh=mesh, sampler_fn=sampler_fn):
      if not sampled:
        summary.first_batch_s = time.monotonic() - loop_start
        summary.first_batch_subjects = len(ids)
      sampled += len(ids)
      for i, volume in zip(ids.tolist(), volumes):
        writer.submit(bids.write_subject, out_dir, labels[i], volume, affine, sidecars[i],
                      plan.output_dtype)
      now = time.monotonic()
      if now - last_log >= progress_every_s:
        _log_progress(process, sampled, len(todo), summary.first_batch_subjects,
                      summary.first_batch_s, now - loop_start)
        last_log = now
  except BaseException:
    writer.close(cancel=True)
    raise
  writer.close()
  summary.generated = writer.written
  summary.wall_s = time.monotonic() - loop_start
  summary.writer_wait_s = writer.wait_s
  return summary


def _log_progress(process: int, done: int, total: int, first_done: int, first_s: float,
                  elapsed: float) -> None:
  # The rate leaves out the first batch, whose time is mostly compilation.
  rest, rest_s = done - first_done, elapsed - first_s
  rate = rest / rest_s if rest > 0 and rest_s > 0 else done / max(elapsed, 1e-9)
  eta = (total - done) / rate if rate > 0 else float("inf")
  logging.info("process %d: %d/%d subjects sampled, %.3f subjects/s, ETA %.0f s", process, done,
               total, rate, eta)


