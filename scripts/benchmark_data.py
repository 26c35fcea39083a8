r"""Data throughput: synthetic-cohort synthesis, the grain pipeline, the loader at the paper grid
from real-size 1 mm files, and the data pre-flight on a 2,000-subject cohort.

    python scripts/benchmark_data.py [--subjects_1mm=3 --subjects_2mm=6 --batches=12]
        [--preflight_subjects=2000 --loader_volumes=12 --paper_workers=0]

Prints a table of subjects/s (synthesis, incl. writing .nii.gz) at 2 mm and 1 mm, volumes/s of
the training pipeline (2 mm, 2 worker processes, batch 4, full preprocessing from .nii.gz),
volumes/s of one loader process (`nifti.load_volume`, what each pipeline worker does) onto the
paper grid 160x224x160 from UK-Biobank-like 182x218x182 int16 .nii.gz files (the MNI152 template
on UK Biobank's MNI grid), and the pre-flight's seconds for a cohort whose images are symlinks to
a few such real-size files (real headers and gzip trailers; their blocks sit in the page cache, as
after a first pass over a cohort). The template is loaded (and cached) before timing; the first
pipeline batch (worker start-up) is excluded. Compare the pipeline's volumes/s with the
autoencoder's examples/s on your hardware.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app
from absl import flags
import ml_collections

import numpy as np

from brain_ldm_jax.data import manifest, nifti, pipeline, preflight, synthetic

_SUBJECTS_1MM = flags.DEFINE_integer("subjects_1mm", 3, "Subjects synthesized at 1 mm.")
_SUBJECTS_2MM = flags.DEFINE_integer("subjects_2mm", 8, "Subjects synthesized at 2 mm.")
_BATCHES = flags.DEFINE_integer("batches", 12, "Timed pipeline batches (after the first).")
_WORKERS = flags.DEFINE_integer("workers", 2, "Pipeline worker processes.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Pipeline batch size.")
_PREFLIGHT = flags.DEFINE_integer("preflight_subjects", 2000, "Subjects of the pre-flight cohort.")
_LOADER = flags.DEFINE_integer("loader_volumes", 12, "Real-size volumes loaded onto the paper grid.")
_PAPER_WORKERS = flags.DEFINE_integer(
    "paper_workers", 0, "Also time the pipeline at the paper grid with this many workers (0: no).")

PAPER_SHAPE = (160, 224, 160)
COVARIATES = ("age", "sex", "ventricular_volume", "brain_volume")
# UK Biobank's MNI152 1 mm grid (FSL's MNI152_T1_1mm): 182x218x182, origin (-90, -126, -72) mm.
UKB_SHAPE = (182, 218, 182)
UKB_ORIGIN = (-90.0, -126.0, -72.0)
REAL_FILES = 8


def time_synthesis(out_dir: str, num: int, spacing: float, shape) -> float:
  """subjects/s of make_cohort, template already cached."""
  synthetic.load_template(spacing)
  synthetic.make_subject(out_dir, 0, 0, spacing, shape)  # warm caches (gradients, grids)
  start = time.perf_counter()
  synthetic.make_cohort(out_dir, num, seed=1, spacing=spacing, shape=shape)
  return num / (time.perf_counter() - start)


def _data_config(data_dir: str, shape, spacing: float, workers: int):
  return ml_collections.ConfigDict(dict(
      data_dir=data_dir, participants_tsv="", image_column="", covariates=COVARIATES,
      shape=tuple(shape), spacing=spacing, clip_percentiles=(0.5, 99.5), num_workers=workers,
      skip_bad_subjects=False, assume_mni=False))


def write_real_size_files(out_dir: str, num: int, shift_mm: float = 0.0) -> list[str]:
  """`num` UK-Biobank-like files: the MNI152 T1 on UK Biobank's 1 mm grid, int16 .nii.gz, each
  with its own intensity scale and noise (so gzip and the loader see distinct real-size data).
  `shift_mm` moves the files' grid off the paper grid's voxel centres, so loading interpolates."""
  from nilearn import datasets  # pylint: disable=import-outside-toplevel  (slow import)
  template = datasets.load_mni152_template(resolution=1)
  source = np.asarray(template.get_fdata(), np.float32)
  ukb = np.diag([1.0, 1.0, 1.0, 1.0])
  ukb[:3, 3] = np.asarray(UKB_ORIGIN) + shift_mm
  # The template's voxel centres are the UK Biobank grid's: the crop starts at a whole voxel.
  start = np.round(np.linalg.inv(template.affine) @ np.array([*UKB_ORIGIN, 1.0]))[:3].astype(int)
  crop = source[tuple(slice(a, a + n) for a, n in zip(start, UKB_SHAPE))]
  rng = np.random.default_rng(0)
  paths = []
  for i in range(num):
    volume = crop * rng.uniform(300, 900) + rng.normal(0, 5, crop.shape).astype(np.float32)
    paths.append(nifti.save_volume(os.path.join(out_dir, f"real-{shift_mm}-{i}.nii.gz"), volume,
                                   ukb, dtype="int16", mni=True))
  return paths


def write_cohort_table(root: str, images: list[str], num: int) -> None:
  """A BIDS cohort of `num` subjects whose images are symlinks to `images` in turn."""
  rows = ["participant_id\t" + "\t".join(COVARIATES)]
  for i in range(num):
    sid = f"sub-{i:05d}"
    anat = os.path.join(root, sid, "anat")
    os.makedirs(anat)
    os.symlink(images[i % len(images)], os.path.join(anat, f"{sid}_T1w.nii.gz"))
    rows.append(f"{sid}\t{50 + i % 30}\t{'MF'[i % 2]}\t{20 + i % 40}\t{1200 + i % 400}")
  with open(os.path.join(root, "participants.tsv"), "w") as f:
    f.write("\n".join(rows) + "\n")


def time_preflight(root: str) -> tuple[float, float]:
  """(wall, CPU) seconds of the pre-flight (table + every image header) over the cohort."""
  data_config = _data_config(root, PAPER_SHAPE, 1.0, 0)
  start, cpu = time.perf_counter(), time.process_time()
  cohort = preflight.check_cohort(data_config)
  seconds = time.perf_counter() - start, time.process_time() - cpu
  assert not cohort.problems, cohort.report()
  return seconds


def time_loader(images: list[str], num: int) -> tuple[float, float]:
  """(volumes/s, volumes per CPU second) of one process loading real-size files onto the paper
  grid: one pipeline worker. CPU seconds are what a worker costs on a core of its own; wall time
  also counts waiting for a busy machine."""
  nifti.load_volume(images[0], PAPER_SHAPE, 1.0)  # imports and allocator warm-up
  start, cpu = time.perf_counter(), time.process_time()
  for i in range(num):
    nifti.load_volume(images[i % len(images)], PAPER_SHAPE, 1.0)
  return num / (time.perf_counter() - start), num / (time.process_time() - cpu)


def time_pipeline(data_dir: str, shape, spacing: float, workers: int | None = None) -> float:
  """volumes/s of the training loader after its first batch."""
  data_config = _data_config(data_dir, shape, spacing,
                             _WORKERS.value if workers is None else workers)
  subjects = manifest.load_cohort(data_config)
  stats = manifest.CovariateStats.from_subjects(subjects, data_config.covariates)
  loader = pipeline.make_train_loader(subjects, stats, data_config, _BATCH.value, seed=0)
  next(loader)
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(loader)
  return _BATCHES.value * _BATCH.value / (time.perf_counter() - start)


def main(argv):
  del argv
  shape_2mm = tuple(n // 2 for n in PAPER_SHAPE)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    d2 = os.path.join(tmp, "2mm")
    rate = time_synthesis(d2, _SUBJECTS_2MM.value, 2.0, shape_2mm)
    rows.append(("synthesis 2 mm " + "x".join(map(str, shape_2mm)), rate, "subjects/s"))
    rate = time_synthesis(os.path.join(tmp, "1mm"), _SUBJECTS_1MM.value, 1.0, PAPER_SHAPE)
    rows.append(("synthesis 1 mm " + "x".join(map(str, PAPER_SHAPE)), rate, "subjects/s"))
    rate = time_pipeline(d2, shape_2mm, 2.0)
    rows.append((f"pipeline 2 mm, {_WORKERS.value} workers, batch {_BATCH.value}", rate,
                 "volumes/s"))
    images = write_real_size_files(os.path.join(tmp, "real"), REAL_FILES)
    rate, per_cpu = time_loader(images, _LOADER.value)
    rows.append(("loader 182x218x182 .nii.gz -> 160x224x160, 1 process", rate, "volumes/s"))
    rows.append(("  the same per CPU second (one worker on its own core)", per_cpu,
                 "volumes/s"))
    shifted = write_real_size_files(os.path.join(tmp, "shifted"), 2, shift_mm=0.5)
    rate, per_cpu = time_loader(shifted, _LOADER.value)
    rows.append(("loader, files 0.5 mm off the grid (interpolated), 1 process", rate,
                 "volumes/s"))
    rows.append(("  the same per CPU second", per_cpu, "volumes/s"))
    cohort = os.path.join(tmp, "cohort")
    write_cohort_table(cohort, images, _PREFLIGHT.value)
    wall, cpu = time_preflight(cohort)
    rows.append((f"pre-flight, {_PREFLIGHT.value} subjects (table + headers), wall", wall, "s"))
    rows.append(("  the same in CPU seconds", cpu, "s"))
    if _PAPER_WORKERS.value:
      rate = time_pipeline(cohort, PAPER_SHAPE, 1.0, _PAPER_WORKERS.value)
      rows.append((f"pipeline 1 mm paper grid, {_PAPER_WORKERS.value} workers, batch "
                   f"{_BATCH.value}", rate, "volumes/s"))
  print(f"{'what':<56} {'value':>8}  unit")
  for name, rate, unit in rows:
    print(f"{name:<56} {rate:8.2f}  {unit}")
  print(f"(cpu cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
  app.run(main)
