r"""Data throughput: synthetic-cohort synthesis and the grain pipeline.

    python scripts/benchmark_data.py [--subjects_1mm=3 --subjects_2mm=6 --batches=12]

Prints a table of subjects/s (synthesis, incl. writing .nii.gz) at 2 mm and 1 mm and volumes/s of
the training pipeline (2 mm, 2 worker processes, batch 4, full preprocessing from .nii.gz). The
template is loaded (and cached) before timing; the first pipeline batch (worker start-up) is
excluded. Compare the pipeline's volumes/s with the autoencoder's examples/s on your hardware.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app
from absl import flags
import ml_collections

from brain_ldm_jax.data import manifest, pipeline, synthetic

_SUBJECTS_1MM = flags.DEFINE_integer("subjects_1mm", 3, "Subjects synthesized at 1 mm.")
_SUBJECTS_2MM = flags.DEFINE_integer("subjects_2mm", 8, "Subjects synthesized at 2 mm.")
_BATCHES = flags.DEFINE_integer("batches", 12, "Timed pipeline batches (after the first).")
_WORKERS = flags.DEFINE_integer("workers", 2, "Pipeline worker processes.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Pipeline batch size.")

PAPER_SHAPE = (160, 224, 160)


def time_synthesis(out_dir: str, num: int, spacing: float, shape) -> float:
  """subjects/s of make_cohort, template already cached."""
  synthetic.load_template(spacing)
  synthetic.make_subject(out_dir, 0, 0, spacing, shape)  # warm caches (gradients, grids)
  start = time.perf_counter()
  synthetic.make_cohort(out_dir, num, seed=1, spacing=spacing, shape=shape)
  return num / (time.perf_counter() - start)


def time_pipeline(data_dir: str, shape, spacing: float) -> float:
  """volumes/s of the training loader after its first batch."""
  data_config = ml_collections.ConfigDict(dict(
      data_dir=data_dir, participants_tsv="", image_column="",
      covariates=("age", "sex", "ventricular_volume", "brain_volume"), shape=shape,
      spacing=spacing, clip_percentiles=(0.5, 99.5), num_workers=_WORKERS.value,
      skip_bad_subjects=False))
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
  print(f"{'what':<44} {'rate':>8}  unit")
  for name, rate, unit in rows:
    print(f"{name:<44} {rate:8.2f}  {unit}")
  print(f"(cpu cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
  app.run(main)
