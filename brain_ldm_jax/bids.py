"""The generated dataset as BIDS: its layout, the plan behind its bytes, its tables and a check.

    OUT/dataset_description.json, README, participants.tsv, participants.json
    OUT/sub-000000/anat/sub-000000_T1w.nii.gz   MNI grid of the run, float32 (or int16) in [0, 1]
    OUT/sub-000000/anat/sub-000000_T1w.json     covariates, model, sampler, seed, subject index
    OUT/.brain_ldm_generate.json                the plan (settings + every subject's covariates)

A subject is finished when its image exists and its sidecar (written after the image) holds
exactly the bytes this plan gives it; the tables are rebuilt from the plan, so a resumed or
host-local dataset gets the same bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
from importlib import metadata
from typing import Any

import jax
import nibabel as nib
import numpy as np

from brain_ldm_jax import files
from brain_ldm_jax.data import nifti

PLAN_FILE = ".brain_ldm_generate.json"
BIDS_VERSION = "1.9.0"
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
  with files.disk_errors(folder):
    os.makedirs(folder, exist_ok=True)
    nifti.save_volume(image_path(out_dir, label), volume, affine, dtype=dtype, mni=True)
    files.write_text_atomic(sidecar_path(out_dir, label), sidecar)


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
  with files.disk_errors(out_dir):
    files.write_text_atomic(os.path.join(out_dir, "participants.tsv"), participants_tsv(plan))
    files.write_text_atomic(os.path.join(out_dir, "participants.json"),
                      files.json_text(participants_json(plan)))
    files.write_text_atomic(os.path.join(out_dir, "dataset_description.json"),
                      files.json_text(dataset_description(plan)))
    files.write_text_atomic(os.path.join(out_dir, "README"), readme(plan))


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
                           if name.startswith(files.TMP_PREFIX) else ""))
  image = image_path(root, label)
  if not os.path.isfile(image):
    problems.append(f"{os.path.relpath(image, root)}: missing")
  else:
    try:
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
    elif entry.name.startswith(files.TMP_PREFIX):
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

