"""Requested covariates: read from a table, or drawn from a cohort (or its ranges).

The generate job reads a table or draws (`draw_covariates`: cohort rows resampled, optionally
stratified by age bin and sex); the evaluate job and the ldm job's summary draw jittered cohort
rows (`draw_conditions`). Values are in natural units (years, mL; sex 0 female, 1 male).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import numpy as np
from absl import logging

from brain_ldm_jax.data import manifest
from brain_ldm_jax.errors import ConfigError, DataError


def _float_cell(name: str, text: str, where: str) -> float:
  """One covariate cell; `sex` also takes M/F/male/female. DataError names row and column."""
  text = text.strip()
  if name == "sex" and text.lower() in manifest.SEX_CODES:
    return manifest.SEX_CODES[text.lower()]
  if text.lower() in manifest.MISSING:
    raise DataError(f"{where}, column {name!r}: empty or n/a; every subject needs a value")
  return manifest.parse_finite(text, lambda is_number: DataError(
      f"{where}, column {name!r}: {text!r} is not a {'finite ' if is_number else ''}number"))


def read_covariates_tsv(path: str, names: Sequence[str]) -> tuple[np.ndarray, list[str] | None]:
  """(N, n) covariates in `names` order and the participant_ids (None without that column)."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: covariates table not found (generate.covariates_tsv)")
  try:
    with open(path, encoding="utf-8-sig", newline="") as f:
      reader = csv.reader(f, delimiter="\t")
      header = [c.strip() for c in next(reader, [])]
      rows = [(line, row) for line, row in enumerate(reader, start=2)
              if any(c.strip() for c in row)]
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


def cohort_table_path(run) -> str | None:
  """The training cohort's participants.tsv named by the config of `run` (an `api.Run`), if it
  is still there."""
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


def draw_conditions(subjects, names, num_samples: int, seed: int,
                    jitter: float = 0.1) -> tuple[np.ndarray, list[str]]:
  """(N, n) requested covariates drawn from the subjects' joint distribution, and the source ids.

  Whole subject rows are resampled (seeded), so the covariates keep the cohort's correlations
  (older subjects have larger ventricles); every continuous covariate then moves by Gaussian
  noise of `jitter` times its standard deviation, clipped to the subjects' range, so N samples
  request N distinct values instead of repeating a few subjects. Binary covariates (sex) are kept.
  """
  if not subjects:
    raise DataError("draw_conditions: no subjects to draw covariates from")
  rng = np.random.default_rng(seed)
  idx = rng.choice(len(subjects), num_samples, replace=num_samples > len(subjects))
  table = np.array([[s.covariates[n] for n in names] for s in subjects], np.float64)
  cond = table[idx]
  for j in range(len(names)):
    column = table[:, j]
    if len(np.unique(column)) <= 2:
      continue
    noise = rng.normal(0.0, jitter * column.std(), num_samples)
    cond[:, j] = np.clip(cond[:, j] + noise, column.min(), column.max())
  return cond, [subjects[i].participant_id for i in idx]
