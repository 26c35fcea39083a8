r"""The `generate` job: a synthetic BIDS dataset of N brains from a trained run.

    python -m brain_ldm_jax.main --config=configs/generate.py --workdir=OUT \
        --config.generate.run_dir=RUN --config.generate.num_subjects=1000

Output (BIDS derivative):
    OUT/dataset_description.json, README, participants.tsv, participants.json
    OUT/sub-000000/anat/sub-000000_T1w.nii.gz   MNI grid of the run (Run.affine), float32 in [0, 1]
    OUT/sub-000000/anat/sub-000000_T1w.json     covariates, model, sampler, seed, subject index
    OUT/.brain_ldm_generate.json                the plan (settings + every subject's covariates)

Determinism: subject i's noise is fold_in(key(seed), i), and with `per_sample_program` (default)
every subject runs through the same batch-1 XLA program (`api.images_fn`), so subject i is the
bitwise same image whatever the batch size, device count, process count or number of restarts
(measured on CPU; a batched program differs by ~4e-6 between batch 1 and 4, which quantised
output would not hide either: values near a rounding boundary would still flip). On GPUs, XLA's
convolution autotuning may pick other algorithms in another process; set
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
import contextlib
import csv
import dataclasses
import errno
import functools
import inspect
import json
import math
import os
import re
import shutil
import threading
import time
import types
from collections.abc import Iterator, Sequence
from importlib import metadata
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec as P

from brain_ldm_jax import api
from brain_ldm_jax import sharding as sharding_lib
from brain_ldm_jax.data import manifest
from brain_ldm_jax.data import nifti
from brain_ldm_jax.diffusion import samplers
from brain_ldm_jax.errors import ConfigError, DataError

PLAN_FILE = ".brain_ldm_generate.json"
TMP_PREFIX = ".tmp-"  # every temporary file starts with it (nifti.save_volume's too)
BIDS_VERSION = "1.9.0"
OUTPUT_DTYPES = ("float32", "int16")
ROOT_FILES = ("dataset_description.json", "participants.tsv", "participants.json", "README",
              PLAN_FILE)
SUBJECT_RE = re.compile(r"^sub-[A-Za-z0-9]+$")
SOURCE_ID_COLUMN = "source_participant_id"
NOISE_RULE = "jax.random.fold_in(jax.random.key(Seed), SubjectIndex)"


@functools.cache
def software_version() -> str:
  try:
    return metadata.version("brain_ldm_jax")
  except metadata.PackageNotFoundError:
    return "unknown"


def subject_label(index: int) -> str:
  return f"sub-{index:06d}"


def image_path(root: str, label: str) -> str:
  return os.path.join(root, label, "anat", f"{label}_T1w.nii.gz")


def sidecar_path(root: str, label: str) -> str:
  return os.path.join(root, label, "anat", f"{label}_T1w.json")


# ----------------------------------------------------------------------------------------------
# Atomic files and disk errors


@contextlib.contextmanager
def disk_errors(directory: str) -> Iterator[None]:
  """A full disk (or quota) becomes a DataError saying where, and that a rerun resumes."""
  try:
    yield
  except OSError as e:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      raise DataError(f"no space left on the device holding {directory} ({e.strerror}); free "
                      "space and rerun the same command: finished subjects are kept and the "
                      "rest resumes") from e
    raise


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` under a temporary name in `path`'s folder, then renames it to `path`."""
  folder, name = os.path.split(path)
  tmp = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{name}")
  try:
    with open(tmp, "w", encoding="utf-8", newline="") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def json_text(obj: Any) -> str:
  """Deterministic JSON (sorted keys, no timestamps): reruns write the same bytes."""
  return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def remove_temporaries(folder: str) -> int:
  """Deletes leftover `.tmp-*` files of a killed run in `folder`; returns how many."""
  removed = 0
  with contextlib.suppress(FileNotFoundError):
    for entry in os.scandir(folder):
      if entry.name.startswith(TMP_PREFIX) and entry.is_file(follow_symlinks=False):
        with contextlib.suppress(FileNotFoundError):
          os.remove(entry.path)
          removed += 1
  return removed


# ----------------------------------------------------------------------------------------------
# Covariates: from a table, or drawn from the training cohort


def _float_cell(name: str, text: str, where: str) -> float:
  """One covariate cell; `sex` also takes M/F/male/female. DataError names row and column."""
  text = text.strip()
  if name == "sex" and text.lower() in manifest.SEX_CODES:
    return manifest.SEX_CODES[text.lower()]
  if text.lower() in manifest.MISSING:
    raise DataError(f"{where}, column {name!r}: empty or n/a; every subject needs a value")
  try:
    value = float(text)
  except ValueError:
    raise DataError(f"{where}, column {name!r}: {text!r} is not a number") from None
  if not math.isfinite(value):
    raise DataError(f"{where}, column {name!r}: {text!r} is not a finite number")
  return value


def read_covariates_tsv(path: str, names: Sequence[str]) -> tuple[np.ndarray, list[str] | None]:
  """(N, n) covariates in `names` order and the participant_ids (None without that column)."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: covariates table not found (generate.covariates_tsv)")
  try:
    with open(path, encoding="utf-8-sig", newline="") as f:
      reader = csv.reader(f, delimiter="\t")
      header = [c.strip() for c in next(reader, [])]
      rows = [(line, row) for line, row in enumerate(reader, start=2) if any(c.strip() for c in row)]
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not a UTF-8 text table ({e})") from e
  missing = [n for n in names if n not in header]
  if missing:
    raise DataError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; the run's "
                    f"covariates are {', '.join(names)} (tab-separated, natural units; "
                    f"columns: {', '.join(header) or 'none'})")
  if not rows:
    raise DataError(f"{path}: has a header but no subjects")
  has_ids = "participant_id" in header
  index = {c: header.index(c) for c in (*names, *(["participant_id"] if has_ids else []))}
  matrix, ids = [], []
  for line, row in rows:
    if len(row) != len(header):
      raise DataError(f"{path}: row {line} has {len(row)} cells but the header has "
                      f"{len(header)} columns")
    where = f"{path}: row {line}"
    if has_ids:
      ids.append(row[index["participant_id"]].strip())
      where += f" ({ids[-1]})"
    matrix.append([_float_cell(n, row[index[n]], where) for n in names])
  if has_ids:
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
      raise DataError(f"{path}: participant_id {', '.join(duplicates)} appears more than once")
  return np.asarray(matrix, np.float64), (ids if has_ids else None)


def cohort_table_path(run: api.Run) -> str | None:
  """The training cohort's participants.tsv named by the run config, if it is still there."""
  data = run.config.data
  candidates = [data.get("participants_tsv", "")]
  if data.get("data_dir", ""):
    candidates.append(os.path.join(data.data_dir, "participants.tsv"))
  else:  # the `ldm` job made a synthetic cohort in <run>/cohort
    candidates.append(os.path.join(run.checkpoint, "cohort", "participants.tsv"))
  for path in candidates:
    if path and os.path.isfile(path):
      return path
  return None


def _uniform(rng: np.random.Generator, stats: manifest.CovariateStats, num: int) -> np.ndarray:
  """Independent draws within the training min/max; `sex` takes its two codes."""
  lo, hi = np.asarray(stats.minimum), np.asarray(stats.maximum)
  draws = lo + (hi - lo) * rng.random((num, len(lo)))
  for j, name in enumerate(stats.names):
    if name == "sex":
      draws[:, j] = np.where(rng.random(num) < 0.5, lo[j], hi[j])
  return draws


def age_bin_edges(stats: manifest.CovariateStats, bins: int) -> np.ndarray:
  lo, hi = stats.minimum[stats.names.index("age")], stats.maximum[stats.names.index("age")]
  return np.linspace(lo, hi, bins + 1)


def _stratum_of(ages: np.ndarray, sexes: np.ndarray, edges: np.ndarray) -> np.ndarray:
  """Stratum index bin * 2 + sex of each row (ages outside the edges go to the end bins)."""
  bins = np.clip(np.searchsorted(edges, ages, side="right") - 1, 0, len(edges) - 2)
  return bins * 2 + (sexes >= 0.5).astype(int)


def draw_covariates(num: int, seed: int, stats: manifest.CovariateStats,
                    cohort: np.ndarray | None, *, stratify: bool = False,
                    age_bins: int = 4) -> np.ndarray:
  """(num, n) covariates: rows of `cohort` resampled (its joint distribution), or uniform.

  With `stratify`, subject i belongs to stratum i mod (age_bins * 2) (age bin x sex), so every
  stratum gets an equal share and any prefix of the dataset is balanced; within a stratum rows
  are resampled from the cohort's rows of that stratum (uniform within it when it has none).
  """
  rng = np.random.default_rng([int(seed), 0x67656E])  # "gen": a stream apart from the noise
  if not stratify:
    if cohort is None:
      return _uniform(rng, stats, num)
    return cohort[rng.integers(0, len(cohort), num)]
  names = stats.names
  if "age" not in names or "sex" not in names:
    raise ConfigError(f"generate.stratify needs covariates 'age' and 'sex'; the run has "
                      f"{', '.join(names)}")
  if age_bins < 1:
    raise ConfigError(f"generate.age_bins={age_bins} must be >= 1")
  ia, isx = names.index("age"), names.index("sex")
  edges = age_bin_edges(stats, age_bins)
  strata = np.arange(num) % (2 * age_bins)
  out = np.zeros((num, len(names)))
  cohort_strata = (None if cohort is None
                   else _stratum_of(cohort[:, ia], cohort[:, isx], edges))
  lo_sex, hi_sex = stats.minimum[isx], stats.maximum[isx]
  for s in range(2 * age_bins):
    rows = np.nonzero(strata == s)[0]
    if not len(rows):
      continue
    pool = None if cohort is None else cohort[cohort_strata == s]
    if pool is not None and len(pool):
      out[rows] = pool[rng.integers(0, len(pool), len(rows))]
      continue
    if pool is not None:
      logging.warning("no training subject in age [%g, %g) sex %d: drawing that stratum "
                      "uniformly", edges[s // 2], edges[s // 2 + 1], s % 2)
    draws = _uniform(rng, stats, len(rows))
    draws[:, ia] = rng.uniform(edges[s // 2], edges[s // 2 + 1], len(rows))
    draws[:, isx] = float(s % 2) if lo_sex != hi_sex else lo_sex
    out[rows] = draws
  return out


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


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything that determines the dataset's bytes: settings and every subject's covariates."""
  names: tuple[str, ...]
  covariates: np.ndarray  # (N, n) natural units
  source_ids: tuple[str, ...] | None  # participant_id of the covariates table, if it had one
  source: str  # how the covariates were chosen, for the README
  model: dict  # provenance of the weights
  sampling: dict  # sampler, num_steps, eta, guidance_scale, timestep_spacing, ...
  seed: int
  output_dtype: str

  @property
  def num_subjects(self) -> int:
    return len(self.covariates)

  def to_json(self) -> dict:
    return dict(names=list(self.names), covariates=self.covariates.tolist(),
                source_ids=None if self.source_ids is None else list(self.source_ids),
                source=self.source, model=self.model, sampling=self.sampling, seed=self.seed,
                output_dtype=self.output_dtype, software_version=software_version())

  def sidecar(self, index: int) -> dict:
    s = self.sampling
    side = {
        "SubjectIndex": index,
        "Covariates": dict(zip(self.names, self.covariates[index].tolist())),
        "Model": self.model,
        "Sampler": s["sampler"], "NumSteps": s["num_steps"], "Eta": s["eta"],
        "GuidanceScale": s["guidance_scale"], "TimestepSpacing": s["timestep_spacing"],
        "PerSampleProgram": s["per_sample_program"],
        "Seed": self.seed, "NoiseKey": NOISE_RULE,
        "SoftwareVersion": {"brain_ldm_jax": software_version(), "jax": jax.__version__},
    }
    if self.source_ids is not None:
      side["SourceParticipantId"] = self.source_ids[index]
    return side


def timestep_spacing(config, sampler: str) -> str:
  """The spacing the sampler will use: the run's, or (when empty) the sampler's own default."""
  if config.sampling.get("timestep_spacing", ""):
    return config.sampling.timestep_spacing
  fn = getattr(samplers, f"{sampler}_sample")
  return inspect.signature(fn).parameters["timestep_spacing"].default


def make_plan(run: api.Run, s: Settings) -> Plan:
  names = tuple(run.config.data.covariates)
  options = api.sampling_options(run, sampler=s.sampler, num_steps=s.num_steps, eta=s.eta,
                                 guidance_scale=s.guidance_scale)
  source_ids = None
  if s.covariates_tsv:
    covariates, ids = read_covariates_tsv(s.covariates_tsv, names)
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
    table = cohort_table_path(run)
    cohort = None
    if table is not None:
      cohort, _ = read_covariates_tsv(table, names)
      source = (f"rows of the training cohort's table {table} resampled with replacement "
                "(its joint distribution of the covariates)")
    else:
      source = ("drawn independently and uniformly within the run's training min/max of each "
                "covariate (the training cohort's participants.tsv was not found), sex as a "
                "fair coin")
    covariates = draw_covariates(s.num_subjects, s.seed, run.stats, cohort,
                                 stratify=s.stratify, age_bins=s.age_bins)
    if s.stratify:
      edges = age_bin_edges(run.stats, s.age_bins)
      source += (f"; stratified by sex x {s.age_bins} age bins with edges "
                 f"{[round(float(e), 3) for e in edges]}, subject i in stratum "
                 f"i mod {2 * s.age_bins}")
  api.normalise_covariates(covariates, run.stats, names)  # warns when extrapolating
  sampling = dict(options, timestep_spacing=timestep_spacing(run.config, options["sampler"]),
                  per_sample_program=s.per_sample_program)
  model = {"RunDirectory": run.checkpoint, "Preset": run.config.get("preset", ""),
           "ScaleFactor": run.scale_factor, "Weights": "UNet EMA + autoencoder, latest "
                                                      "checkpoints"}
  return Plan(names=names, covariates=np.asarray(covariates, np.float64),
              source_ids=source_ids, source=source, model=model, sampling=sampling,
              seed=s.seed, output_dtype=s.output_dtype)


def check_or_write_plan(plan: Plan, out_dir: str, overwrite: bool) -> None:
  """Refuses to mix two different datasets in one folder; process 0 records the plan.

  Every process reads the existing plan before any writes it (a barrier in between), so all
  reach the same verdict.
  """
  path = os.path.join(out_dir, PLAN_FILE)
  text = json_text(plan.to_json())
  if os.path.exists(path) and not overwrite:
    with open(path, encoding="utf-8") as f:
      previous = f.read()
    if previous != text:
      raise ConfigError(f"{out_dir} holds a dataset made with other settings, covariates or "
                        f"software ({path} differs); use another --workdir / "
                        "generate.out_dir, or --config.generate.overwrite=True to replace it")
  _barrier("generate_plan_checked")
  if jax.process_index() == 0:
    with disk_errors(out_dir):
      write_text_atomic(path, text)
  _barrier("generate_plan_written")


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


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


def expected_params(config) -> dict:
  """Abstract parameter trees of the run's networks (no compute)."""
  from brain_ldm_jax.nn import autoencoder as autoencoder_lib  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax.nn import unet as unet_lib  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax.train.ldm import latent_shape  # pylint: disable=g-import-not-at-top
  unet = unet_lib.build_unet(config.unet)
  autoencoder = autoencoder_lib.build_autoencoder(config.autoencoder)
  zshape = latent_shape(config)
  key = jax.random.key(0)

  def init():
    x, context = unet_lib.hybrid_conditioning(jnp.zeros((1,) + zshape),
                                              jnp.zeros((1, len(config.data.covariates))))
    u = unet.init(key, x, jnp.zeros((1,), jnp.int32), context=context)["params"]
    image = jnp.zeros((1,) + tuple(config.data.shape) + (config.autoencoder.in_channels,))
    a = autoencoder.init(key, image, key)["params"]
    return {"autoencoder": a, "unet": u}

  return jax.eval_shape(init)


def random_params(config, seed: int = 0) -> dict:
  """Fan-in-scaled random weights of the run's networks, for tests and benchmarks.

  Shapes come from `expected_params` and values from numpy, so no network init has to compile.
  """
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return np.ones(x.shape, np.float32)
    if name.endswith("['bias']"):
      return np.zeros(x.shape, np.float32)
    fan_in = int(np.prod(x.shape[:-1])) or 1
    return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, expected_params(config))


def param_mismatches(run: api.Run) -> list[str]:
  """Differences in names and shapes between the checkpoint and the run's networks."""
  want = {jax.tree_util.keystr(p): x.shape
          for p, x in jax.tree_util.tree_leaves_with_path(expected_params(run.config))}
  have = {jax.tree_util.keystr(p): np.shape(x)
          for p, x in jax.tree_util.tree_leaves_with_path(run.params)}
  problems = [f"{k} missing" for k in sorted(set(want) - set(have))]
  problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
  problems += [f"{k} has shape {have[k]}, the network wants {want[k]}"
               for k in sorted(set(want) & set(have)) if tuple(have[k]) != tuple(want[k])]
  return problems


# ----------------------------------------------------------------------------------------------
# Sampling on this process's devices


def local_mesh(mesh_config):
  """The mesh over this process's devices: processes sample independently (no collectives)."""
  if jax.process_count() > 1:
    # The configured global `data` size does not apply to one process's devices.
    mesh_config = types.SimpleNamespace(data=-1, fsdp=mesh_config.fsdp)
  return sharding_lib.make_mesh(mesh_config, devices=jax.local_devices())


def make_sharded_sampler(run: api.Run, mesh, sampling: dict) -> Callable:
  """Jitted `(params, key, cond (B, n) normalised, ids (B,)) -> (B, X, Y, Z)` split over `mesh`.

  `shard_map` gives each device its rows, which it runs as `api.images_fn` does (per-sample
  program or one batch); params are replicated.
  """
  fn = api.images_fn(run, sampler=sampling["sampler"], num_steps=sampling["num_steps"],
                     eta=sampling["eta"], guidance_scale=sampling["guidance_scale"],
                     per_sample=sampling["per_sample_program"])
  rows = P(sharding_lib.DATA_AXES)
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(), rows, rows), out_specs=rows,
                               check_vma=False))


def process_share(num_subjects: int, process: int, processes: int) -> list[int]:
  """Subject indices of one process: every P-th, so shares differ by at most one."""
  return list(range(process, num_subjects, processes))


def batches(ids: Sequence[int], size: int) -> Iterator[tuple[np.ndarray, int]]:
  """(ids padded to `size` by repeating the last, number of real ids) for each batch."""
  for start in range(0, len(ids), size):
    chunk = list(ids[start:start + size])
    real = len(chunk)
    yield np.asarray(chunk + chunk[-1:] * (size - real), np.int32), real


# ----------------------------------------------------------------------------------------------
# Writing


def subject_is_finished(out_dir: str, label: str, sidecar: str) -> bool:
  """Image present and sidecar holding exactly the bytes this run would write."""
  if not os.path.isfile(image_path(out_dir, label)):
    return False
  try:
    with open(sidecar_path(out_dir, label), encoding="utf-8") as f:
      return f.read() == sidecar
  except (OSError, UnicodeDecodeError):
    return False


def write_subject(out_dir: str, label: str, volume: np.ndarray, affine: np.ndarray,
                  sidecar: str, dtype: str) -> None:
  """Image, then sidecar (the completion mark), each atomically."""
  folder = os.path.dirname(image_path(out_dir, label))
  with disk_errors(folder):
    os.makedirs(folder, exist_ok=True)
    nifti.save_volume(image_path(out_dir, label), volume, affine, dtype=dtype, mni=True)
    write_text_atomic(sidecar_path(out_dir, label), sidecar)


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


def generate_subjects(run: api.Run, plan: Plan, out_dir: str, *, mesh, batch_size: int,
                      writer_threads: int = 2, max_pending_subjects: int = 0,
                      overwrite: bool = False, progress_every_s: float = 10.0,
                      sampler_fn: Callable | None = None) -> Summary:
  """Samples and writes this process's unfinished subjects; returns counts and timings.

  `batch_size` is global; this process runs batch_size / process_count rows per call, split over
  `mesh`'s batch axes. `sampler_fn` may be a prebuilt `make_sharded_sampler` (benchmarks reuse
  its compilation).
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
  sidecars = {i: json_text(plan.sidecar(i)) for i in mine}
  labels = {i: subject_label(i) for i in mine}
  for i in mine:  # stale temporaries of a killed run, in this process's folders only
    remove_temporaries(os.path.dirname(image_path(out_dir, labels[i])))
  todo = [i for i in mine
          if overwrite or not subject_is_finished(out_dir, labels[i], sidecars[i])]
  logging.info("process %d: %d of %d subjects assigned, %d already finished, %d to generate "
               "(batch %d on %d device(s))", process, len(mine), plan.num_subjects,
               len(mine) - len(todo), len(todo), local_batch, shards)
  summary = Summary(plan.num_subjects, len(mine), len(mine) - len(todo))
  if not todo:
    return summary

  sample = sampler_fn or make_sharded_sampler(run, mesh, plan.sampling)
  params = jax.device_put(run.params, sharding_lib.replicated(mesh))
  key = jax.random.key(plan.seed)
  normalised = np.asarray(run.stats.normalise(plan.covariates), np.float32)
  affine = np.asarray(run.affine)
  writer = Writer(writer_threads, max_pending_subjects or 2 * local_batch)

  def dispatch(ids):
    cond = sharding_lib.global_batch(normalised[ids], mesh)
    return sample(params, key, cond, sharding_lib.global_batch(ids, mesh))

  sampled = 0
  loop_start = last_log = time.monotonic()

  def hand_off(ids, real, images):
    nonlocal sampled, last_log
    volumes = np.asarray(images)  # waits for this batch only; the next one is already queued
    if not sampled:
      summary.first_batch_s, summary.first_batch_subjects = time.monotonic() - loop_start, real
    sampled += real
    for i, volume in zip(ids[:real].tolist(), volumes[:real]):
      writer.submit(write_subject, out_dir, labels[i], volume, affine, sidecars[i],
                    plan.output_dtype)
    now = time.monotonic()
    if now - last_log >= progress_every_s:
      _log_progress(process, sampled, len(todo), summary.first_batch_subjects,
                    summary.first_batch_s, now - loop_start)
      last_log = now

  in_flight = None
  try:
    for ids, real in batches(todo, local_batch):
      images = dispatch(ids)  # asynchronous: the devices start on it while we hand off
      if in_flight is not None:
        hand_off(*in_flight)
      in_flight = (ids, real, images)
    hand_off(*in_flight)
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


# ----------------------------------------------------------------------------------------------
# Tables


def _number(value: float) -> str:
  """Shortest text that reads back as the same float64 (TSV and sidecars agree exactly)."""
  return repr(float(value))


def participants_tsv(plan: Plan) -> str:
  columns = ["participant_id", *plan.names]
  if plan.source_ids is not None:
    columns.append(SOURCE_ID_COLUMN)
  lines = ["\t".join(columns)]
  for i in range(plan.num_subjects):
    row = [subject_label(i), *map(_number, plan.covariates[i])]
    if plan.source_ids is not None:
      row.append(plan.source_ids[i] or "n/a")
    lines.append("\t".join(row))
  return "\n".join(lines) + "\n"


COLUMN_DESCRIPTIONS = {
    "participant_id": {"Description": "Synthetic subject; the number is the SubjectIndex"},
    "age": {"Description": "Requested age", "Units": "year"},
    "sex": {"Description": "Requested sex", "Levels": {"0.0": "female", "1.0": "male"}},
    "ventricular_volume": {"Description": "Requested ventricular CSF volume", "Units": "mL"},
    "brain_volume": {"Description": "Requested brain volume", "Units": "mL"},
    SOURCE_ID_COLUMN: {"Description": "participant_id of the row of the covariates table the "
                                      "subject was generated for"},
}


def participants_json(plan: Plan) -> dict:
  columns = ["participant_id", *plan.names] + ([SOURCE_ID_COLUMN] if plan.source_ids else [])
  return {c: COLUMN_DESCRIPTIONS.get(c, {"Description": f"Requested {c}"}) for c in columns}


def dataset_description(plan: Plan) -> dict:
  s = plan.sampling
  return {
      "Name": "Synthetic T1-weighted brain MRI from a latent diffusion model",
      "BIDSVersion": BIDS_VERSION,
      "DatasetType": "derivative",
      "GeneratedBy": [{
          "Name": "brain_ldm_jax",
          "Version": software_version(),
          "Description": (
              f"Latent diffusion model (Pinaya et al. 2022) in JAX; {plan.num_subjects} subjects "
              f"sampled with {s['sampler']} ({s['num_steps']} steps, eta {s['eta']}, guidance "
              f"{s['guidance_scale']}), seed {plan.seed}. Covariates: {plan.source}."),
      }],
      "SourceDatasets": [{"URL": "file://" + plan.model["RunDirectory"]}],
  }


def readme(plan: Plan) -> str:
  s = plan.sampling
  return "\n".join([
      "Synthetic T1-weighted brain MRI",
      "",
      f"{plan.num_subjects} brains generated by brain_ldm_jax {software_version()} from the "
      f"trained run {plan.model['RunDirectory']}.",
      f"Sampler: {s['sampler']}, {s['num_steps']} steps, eta {s['eta']}, guidance scale "
      f"{s['guidance_scale']}, timestep spacing {s['timestep_spacing']}.",
      f"Noise: subject i uses {NOISE_RULE} with Seed {plan.seed}; each subject is reproducible "
      "on its own, whatever the batch size or device count.",
      f"Covariates (natural units, participants.tsv and each sidecar): {plan.source}.",
      "Images are in the MNI grid of the run (qform/sform code MNI152), intensities in [0, 1].",
      "",
  ])


def write_tables(plan: Plan, out_dir: str) -> None:
  """participants.tsv/.json, dataset_description.json, README: process 0, atomically."""
  if jax.process_index() != 0:
    return
  with disk_errors(out_dir):
    write_text_atomic(os.path.join(out_dir, "participants.tsv"), participants_tsv(plan))
    write_text_atomic(os.path.join(out_dir, "participants.json"),
                      json_text(participants_json(plan)))
    write_text_atomic(os.path.join(out_dir, "dataset_description.json"),
                      json_text(dataset_description(plan)))
    write_text_atomic(os.path.join(out_dir, "README"), readme(plan))


def remove_other_subjects(out_dir: str, num_subjects: int) -> None:
  """With overwrite: subject folders beyond the new plan's N (process 0, shared disks)."""
  if jax.process_index() != 0 or not os.path.isdir(out_dir):
    return
  keep = {subject_label(i) for i in range(num_subjects)}
  for entry in os.scandir(out_dir):
    if entry.is_dir() and entry.name.startswith("sub-") and entry.name not in keep:
      shutil.rmtree(entry.path)


# ----------------------------------------------------------------------------------------------
# BIDS check


def _read_json(path: str, problems: list[str]) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except FileNotFoundError:
    problems.append(f"{path}: missing")
    return None
  except (OSError, ValueError) as e:
    problems.append(f"{path}: not valid JSON ({e})")
    return None
  if not isinstance(value, dict):
    problems.append(f"{path}: not a JSON object")
    return None
  return value


def _check_description(root: str, problems: list[str]) -> None:
  d = _read_json(os.path.join(root, "dataset_description.json"), problems)
  if d is None:
    return
  for field in ("Name", "BIDSVersion", "DatasetType", "GeneratedBy"):
    if field not in d:
      problems.append(f"dataset_description.json: missing {field}")
  if d.get("DatasetType", "derivative") != "derivative":
    problems.append(f"dataset_description.json: DatasetType {d['DatasetType']!r}, want "
                    "'derivative'")
  generated = d.get("GeneratedBy", [{}])
  if not (isinstance(generated, list) and generated
          and all(isinstance(g, dict) and g.get("Name") for g in generated)):
    problems.append("dataset_description.json: GeneratedBy must be a list of objects with Name")


def _read_participants(root: str, problems: list[str]) -> tuple[list[str], list[list[str]]]:
  path = os.path.join(root, "participants.tsv")
  try:
    with open(path, encoding="utf-8", newline="") as f:
      rows = [line.rstrip("\n").split("\t") for line in f]
  except FileNotFoundError:
    problems.append("participants.tsv: missing")
    return [], []
  if not rows or rows[0][:1] != ["participant_id"]:
    problems.append("participants.tsv: the first column must be participant_id")
    return [], []
  header, body = rows[0], rows[1:]
  for line, row in enumerate(body, start=2):
    if len(row) != len(header):
      problems.append(f"participants.tsv: row {line} has {len(row)} cells, header {len(header)}")
  return header, [r for r in body if len(r) == len(header)]


def _same_value(text: str, value: Any) -> bool:
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    try:
      return float(text) == float(value)
    except ValueError:
      return False
  return text == str(value)


def _check_subject(root: str, label: str, columns: dict[str, str], problems: list[str]) -> None:
  anat = os.path.join(root, label, "anat")
  for dirpath, dirnames, filenames in os.walk(os.path.join(root, label)):
    rel = os.path.relpath(dirpath, root)
    for name in dirnames:
      if os.path.join(rel, name) != os.path.join(label, "anat"):
        problems.append(f"{os.path.join(rel, name)}: unexpected folder")
    for name in filenames:
      if name not in (f"{label}_T1w.nii.gz", f"{label}_T1w.json") or dirpath != anat:
        problems.append(f"{os.path.join(rel, name)}: unexpected file"
                        + (" (a temporary of an interrupted run)"
                           if name.startswith(TMP_PREFIX) else ""))
  image = image_path(root, label)
  if not os.path.isfile(image):
    problems.append(f"{os.path.relpath(image, root)}: missing")
  else:
    try:
      import nibabel as nib  # pylint: disable=g-import-not-at-top
      header = nib.load(image).header
      if len(header.get_data_shape()) != 3:
        problems.append(f"{os.path.relpath(image, root)}: not a 3D image")
      if int(header["sform_code"]) != nifti.XFORM_MNI:
        problems.append(f"{os.path.relpath(image, root)}: sform code is not MNI152")
    except Exception as e:  # nibabel raises many types for broken files
      problems.append(f"{os.path.relpath(image, root)}: unreadable ({e})")
  side = _read_json(sidecar_path(root, label), problems)
  if side is None:
    return
  covariates = side.get("Covariates")
  if not isinstance(covariates, dict):
    problems.append(f"{label}_T1w.json: no Covariates object")
    return
  expected = {k: v for k, v in columns.items() if k not in ("participant_id", SOURCE_ID_COLUMN)}
  if set(covariates) != set(expected):
    problems.append(f"{label}_T1w.json: covariates {sorted(covariates)} but participants.tsv "
                    f"has {sorted(expected)}")
  for name, text in expected.items():
    if name in covariates and not _same_value(text, covariates[name]):
      problems.append(f"{label}: {name} is {text} in participants.tsv but "
                      f"{covariates[name]} in the sidecar")
  if SOURCE_ID_COLUMN in columns and side.get("SourceParticipantId") != columns[SOURCE_ID_COLUMN]:
    problems.append(f"{label}: {SOURCE_ID_COLUMN} differs between participants.tsv and sidecar")
  for field in ("SubjectIndex", "Sampler", "NumSteps", "Seed", "SoftwareVersion", "Model"):
    if field not in side:
      problems.append(f"{label}_T1w.json: missing {field}")


def check_bids_dataset(path: str) -> list[str]:
  """Problems with the structure of a generated dataset; [] when it is sound.

  Checks: dataset_description.json (derivative, GeneratedBy), participants.tsv (participant_id
  first, unique valid labels), one sub-X/anat/sub-X_T1w.nii.gz (3D, MNI sform) and .json sidecar
  per row and no subject folder without a row, sidecar covariates equal to the TSV's columns,
  and no stray or temporary files.
  """
  problems: list[str] = []
  if not os.path.isdir(path):
    return [f"{path}: not a folder"]
  _check_description(path, problems)
  header, rows = _read_participants(path, problems)
  labels = [r[0] for r in rows]
  for label in sorted({l for l in labels if labels.count(l) > 1}):
    problems.append(f"participants.tsv: {label} listed more than once")
  for label in labels:
    if not SUBJECT_RE.match(label):
      problems.append(f"participants.tsv: {label!r} is not a BIDS label (sub-<alphanumeric>)")
  folders = set()
  for entry in os.scandir(path):
    if entry.is_dir() and entry.name.startswith("sub-"):
      folders.add(entry.name)
    elif entry.name.startswith(TMP_PREFIX):
      problems.append(f"{entry.name}: a temporary file of an interrupted run")
    elif entry.name not in ROOT_FILES and not entry.name.startswith("."):
      problems.append(f"{entry.name}: unexpected at the dataset root")
  for label in sorted(folders - set(labels)):
    problems.append(f"{label}: folder without a row in participants.tsv")
  for row in rows:
    if SUBJECT_RE.match(row[0]) and row[0] in folders:
      _check_subject(path, row[0], dict(zip(header, row)), problems)
    elif SUBJECT_RE.match(row[0]):
      problems.append(f"{row[0]}: in participants.tsv but has no folder")
  return problems


# ----------------------------------------------------------------------------------------------
# The job


def run_generate_job(config, workdir: str) -> None:
  """`config.job == "generate"`: see the module docstring."""
  s = settings_from_config(config, workdir)
  run = load_checked_run(s.run_dir)
  plan = make_plan(run, s)
  os.makedirs(s.out_dir, exist_ok=True)
  check_or_write_plan(plan, s.out_dir, s.overwrite)
  if s.overwrite:
    remove_other_subjects(s.out_dir, plan.num_subjects)
  if jax.process_index() == 0:
    remove_temporaries(s.out_dir)
  mesh = local_mesh(config.mesh)
  logging.info("generating %d subjects from %s into %s: %s, seed %d; covariates %s",
               plan.num_subjects, s.run_dir, s.out_dir, plan.sampling, s.seed, plan.source)
  summary = generate_subjects(run, plan, s.out_dir, mesh=mesh, batch_size=s.batch_size,
                              writer_threads=s.writer_threads,
                              max_pending_subjects=s.max_pending_subjects,
                              overwrite=s.overwrite, progress_every_s=s.progress_every_s)
  _barrier("generate_subjects_done")
  write_tables(plan, s.out_dir)
  rate = summary.generated / summary.wall_s if summary.wall_s > 0 else 0.0
  logging.info(
      "done: %s — process %d generated %d subjects (%d already finished) in %.1f s, "
      "%.3f subjects/s (%.2f s/subject after the first batch, which includes compilation); "
      "waited %.1f s for the writers", s.out_dir, jax.process_index(), summary.generated,
      summary.skipped, summary.wall_s, rate, summary.steady_s_per_subject, summary.writer_wait_s)
  if jax.process_index() == 0:
    problems = check_bids_dataset(s.out_dir)
    if problems:  # only when another process's disk is not shared, or the folder has extras
      logging.warning("dataset check: %d problem(s), first: %s", len(problems), problems[:5])
