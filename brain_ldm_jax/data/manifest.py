"""Cohort manifests: a BIDS participants.tsv, its images, the train/val split, covariate scaling.

Columns: `participant_id` and the covariates of `data.covariates` (age, sex, ventricular_volume,
brain_volume by default); other columns are kept in `Subject.extra`. Images are found by BIDS path
(<root>/sub-X/[ses-*/]anat/sub-X*_T1w.nii[.gz], first in sorted order) or, when
`data.image_column` is set, read from that column (relative paths are relative to the TSV).

`sex` accepts M/F, male/female (any case) or 1/0 and becomes 1.0 (male) / 0.0 (female), the
paper's coding. BIDS "n/a" counts as missing.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence

import numpy as np

from brain_ldm_jax.errors import ConfigError, DataError

MISSING = ("", "n/a", "na", "nan")
SEX_CODES = {"m": 1.0, "male": 1.0, "1": 1.0, "f": 0.0, "female": 0.0, "0": 0.0}


@dataclasses.dataclass(frozen=True)
class Subject:
  participant_id: str
  image_path: str
  covariates: dict[str, float]
  extra: dict[str, str] = dataclasses.field(default_factory=dict)


def tsv_path(data_config) -> str:
  """participants.tsv of the configured cohort."""
  if data_config.participants_tsv:
    return data_config.participants_tsv
  if not data_config.data_dir:
    raise ConfigError("data.data_dir and data.participants_tsv are both empty: set one, or let "
                      "the job make the synthetic cohort (synthetic.ensure_cohort)")
  return os.path.join(data_config.data_dir, "participants.tsv")


def _read_tsv(path: str) -> tuple[list[str], list[dict[str, str]]]:
  if not os.path.isfile(path):
    raise DataError(f"{path}: participants table not found; set data.data_dir (a BIDS folder "
                    "with participants.tsv) or data.participants_tsv")
  with open(path, encoding="utf-8-sig", newline="") as f:
    reader = csv.DictReader(f, delimiter="\t")
    rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            for row in reader]
    columns = [c.strip() for c in (reader.fieldnames or [])]
  return columns, rows


def parse_covariate(name: str, text: str, subject: str) -> float:
  """One covariate cell as a float; `sex` also accepts M/F/male/female."""
  if text.lower() in MISSING:
    raise DataError(f"subject {subject} has no value in column {name!r}; fill it in or remove "
                    "the subject")
  if name == "sex":
    if text.lower() in SEX_CODES:
      return SEX_CODES[text.lower()]
    raise DataError(f"subject {subject} has sex={text!r}; use M/F, male/female or 1/0")
  return parse_finite(text, lambda is_number: DataError(
      f"subject {subject} has non-{'finite' if is_number else 'numeric'} {name}={text!r}"))


def parse_finite(text: str, error: Callable[[bool], Exception]) -> float:
  """float(text); raises error(False) when text is no number, error(True) when inf or nan."""
  try:
    value = float(text)
  except ValueError:
    raise error(False) from None
  if not math.isfinite(value):
    raise error(True)
  return value


def find_bids_image(root: str, participant_id: str) -> str | None:
  """The subject's T1w image by BIDS path, or None."""
  patterns = [os.path.join(root, participant_id, *sub, f"{participant_id}*_T1w.nii{ext}")
              for sub in (("anat",), ("ses-*", "anat")) for ext in (".gz", "")]
  for pattern in patterns:
    matches = sorted(glob.glob(pattern))
    if matches:
      return matches[0]
  return None


def _image_path(row: dict[str, str], sid: str, path: str, root: str, image_column: str) -> str:
  if image_column:
    image = row.get(image_column, "")
    if image.lower() in MISSING:
      raise DataError(f"subject {sid} has no image in column {image_column!r}")
    image = image if os.path.isabs(image) else os.path.join(os.path.dirname(path), image)
    if not os.path.isfile(image):
      raise DataError(f"subject {sid}: image {image} (column {image_column!r}) not found")
    return image
  image = find_bids_image(root, sid)
  if image is None:
    raise DataError(f"subject {sid}: no image at {root}/{sid}/anat/{sid}*_T1w.nii[.gz]; add it, "
                    "remove the subject, or set data.image_column")
  return image


@dataclasses.dataclass(frozen=True)
class Problem:
  """One thing wrong with one subject (its participant_id, or the table line that has none)."""
  subject: str
  message: str


@dataclasses.dataclass(frozen=True)
class Cohort:
  """A table's complete subjects and every problem found in it."""
  tsv: str
  subjects: list[Subject]
  problems: list[Problem]
  num_subjects: int  # distinct participant_ids (and rows without one)

  def bad_subjects(self) -> set[str]:
    return {p.subject for p in self.problems}

  def good_subjects(self) -> list[Subject]:
    """Subjects without any problem (a duplicated id drops all of its rows)."""
    bad = self.bad_subjects()
    return [s for s in self.subjects if s.participant_id not in bad]

  def report(self) -> str:
    """Every problem, one per line, under a line that says what to do."""
    lines = [f"{self.tsv}: {len(self.bad_subjects())} of {self.num_subjects} subjects have problems "
             f"({len(self.problems)} in all); fix them, or set data.skip_bad_subjects=True to "
             "leave these subjects out:"]
    lines += [f"  {p.message}" for p in self.problems]
    return "\n".join(lines)


def read_cohort(data_config) -> Cohort:
  """The configured participants.tsv: its complete subjects and every problem of its rows.

  A table that cannot be used at all (not found, columns missing, no rows) raises DataError.
  """
  path = tsv_path(data_config)
  columns, rows = _read_tsv(path)
  covariates = tuple(data_config.covariates)
  image_column = data_config.image_column
  missing = [c for c in ("participant_id", *covariates, *([image_column] if image_column else []))
             if c not in columns]
  if missing:
    raise DataError(f"{path}: missing column{'s' * (len(missing) > 1)} "
                    f"{', '.join(map(repr, missing))} (columns: {', '.join(columns)})")
  if not rows:
    raise DataError(f"{path}: has no subjects")
  root = data_config.data_dir or os.path.dirname(path)
  subjects, problems, first_line = [], [], {}
  for line, row in enumerate(rows, start=2):
    sid = row["participant_id"]
    if not sid:
      problems.append(Problem(f"line {line}", f"line {line} has an empty participant_id"))
      continue
    if not sid.startswith("sub-"):
      sid = f"sub-{sid}"  # BIDS ids carry the prefix; tables often drop it
    if sid in first_line:
      problems.append(Problem(sid, f"participant_id {sid} appears twice (lines "
                                   f"{first_line[sid]} and {line}); keep one row"))
      continue
    first_line[sid] = line
    values, row_problems = {}, []
    for name in covariates:
      try:
        values[name] = parse_covariate(name, row[name], sid)
      except DataError as e:
        row_problems.append(str(e))
    try:
      image = _image_path(row, sid, path, root, image_column)
    except DataError as e:
      row_problems.append(str(e))
    if row_problems:
      problems.extend(Problem(sid, m) for m in row_problems)
      continue
    extra = {k: v for k, v in row.items()
             if k not in ("participant_id", *covariates, image_column)}
    subjects.append(Subject(sid, image, values, extra))
  unnamed = sum(p.subject.startswith("line ") for p in problems)
  return Cohort(path, subjects, problems, len(first_line) + unnamed)


def load_cohort(data_config) -> list[Subject]:
  """Subjects of the configured participants.tsv; one DataError listing every bad row."""
  cohort = read_cohort(data_config)
  if cohort.problems:
    raise DataError(cohort.report())
  return cohort.subjects


def _rank(participant_id: str, seed: int) -> str:
  return hashlib.sha256(f"{seed}:{participant_id}".encode()).hexdigest()


def split_subjects(subjects: Sequence[Subject], val_fraction: float,
                   seed: int) -> tuple[list[Subject], list[Subject]]:
  """Deterministic (train, val) split by hashing subject ids: independent of the table's order.

  The val split holds round(n * val_fraction) subjects (at least one when val_fraction > 0 and
  n > 1); both keep the input order.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ConfigError(f"data.val_fraction={val_fraction} must be in [0, 1)")
  n = len(subjects)
  if n == 0:
    raise DataError("the cohort is empty: nothing to split")
  n_val = int(round(n * val_fraction))
  if val_fraction > 0 and n > 1:
    n_val = min(max(n_val, 1), n - 1)
  ranked = sorted(subjects, key=lambda s: _rank(s.participant_id, seed))
  val_ids = {s.participant_id for s in ranked[:n_val]}
  train = [s for s in subjects if s.participant_id not in val_ids]
  val = [s for s in subjects if s.participant_id in val_ids]
  return train, val


@dataclasses.dataclass(frozen=True)
class CovariateStats:
  """Per-covariate min/max of the training split; min-max scaling to [0, 1] as in the paper."""
  names: tuple[str, ...]
  minimum: tuple[float, ...]
  maximum: tuple[float, ...]

  @classmethod
  def from_subjects(cls, subjects: Sequence[Subject], names: Sequence[str]) -> CovariateStats:
    if not subjects:
      raise DataError("cannot compute covariate ranges of an empty training split")
    values = np.asarray([[s.covariates[n] for n in names] for s in subjects], np.float64)
    return cls(tuple(names), tuple(values.min(0).tolist()), tuple(values.max(0).tolist()))

  def _range(self) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.asarray(self.minimum), np.asarray(self.maximum)
    # A covariate constant in training (e.g. one sex only) maps to 0 instead of dividing by 0.
    return lo, np.where(hi > lo, hi - lo, 1.0)

  def normalise(self, values) -> np.ndarray:
    """(..., n_covariates) raw values -> [0, 1] (outside it for values beyond training range)."""
    lo, span = self._range()
    return ((np.asarray(values, np.float64) - lo) / span).astype(np.float32)

  def denormalise(self, values) -> np.ndarray:
    lo, span = self._range()
    return (np.asarray(values, np.float64) * span + lo).astype(np.float32)

  def vector(self, subject: Subject) -> np.ndarray:
    """A subject's normalised covariates in `names` order."""
    return self.normalise([subject.covariates[n] for n in self.names])

  def to_json(self) -> str:
    return json.dumps({"names": list(self.names), "minimum": list(self.minimum),
                       "maximum": list(self.maximum)})

  @classmethod
  def from_json(cls, text: str) -> CovariateStats:
    try:
      d = json.loads(text)
      return cls(tuple(d["names"]), tuple(map(float, d["minimum"])),
                 tuple(map(float, d["maximum"])))
    except (ValueError, KeyError, TypeError) as e:
      raise DataError(f"covariate statistics are malformed ({e}); expected JSON with names, "
                      "minimum, maximum") from e
