r"""Is writing hidden behind sampling? Generation time per subject vs pure sampling time.

    python scripts/benchmark_generate.py --preset=demo --num_subjects=8 --batch_size=2

Random weights of the preset's networks (the timing does not depend on their values). Three
measurements, after one warm-up call that compiles the sampler:
  sampling     the jitted, sharded sampler over all subjects, results copied to the host, nothing
               written (the device's throughput);
  write only   compressing and writing the same volumes serially on one thread (the host's cost);
  generation   `generate.generate_subjects`, the job's loop: sampling with writes on threads.
When writing is overlapped, generation per subject ~ sampling per subject. Each is repeated
`--repeats` times (interleaved); the minimum (least disturbed by other load on a shared machine)
and the median are reported.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app
from absl import flags

from brain_ldm_jax import api
from brain_ldm_jax import bids
from brain_ldm_jax import covariates
from brain_ldm_jax import files
from brain_ldm_jax import generate
from brain_ldm_jax import networks
from brain_ldm_jax import presets
from brain_ldm_jax import sampling as sampling_lib
from brain_ldm_jax import sharding as sharding_lib
from brain_ldm_jax.data import manifest
from brain_ldm_jax.data import nifti
from brain_ldm_jax.nn import ops

_PRESET = flags.DEFINE_enum("preset", "demo", presets.PRESETS, "Network and image sizes.")
_NUM_SUBJECTS = flags.DEFINE_integer("num_subjects", 8, "Subjects per measurement.")
_BATCH = flags.DEFINE_integer("batch_size", 2, "Global batch size.")
_STEPS = flags.DEFINE_integer("num_steps", 50, "Sampler steps.")
_SAMPLER = flags.DEFINE_string("sampler", "ddim", "ddpm | ddim | dpmpp_2m")
_WRITERS = flags.DEFINE_integer("writer_threads", 2, "Writer threads.")
_DTYPE = flags.DEFINE_enum("output_dtype", "float32", generate.OUTPUT_DTYPES, "NIfTI dtype.")
_PER_SAMPLE = flags.DEFINE_bool("per_sample_program", True, "See generate.per_sample_program.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Interleaved repetitions; the median is shown.")
_OUT = flags.DEFINE_string("out_dir", "", "Scratch folder (default: a temporary one).")


def make_run(preset: str) -> api.Run:
  config = presets.base_config(preset)
  names = tuple(config.data.covariates)
  stats = manifest.CovariateStats(names, (45.0, 0.0, 10.0, 1000.0), (80.0, 1.0, 120.0, 1500.0))
  return api.Run(config=config, params=jax.jit(lambda k: networks.init_params(config, k))(jax.random.key(0)), stats=stats,
                 scale_factor=1.0,
                 affine=nifti.mni_affine(config.data.shape, config.data.spacing),
                 checkpoint=f"random weights ({preset})")


def make_plan(run: api.Run, num: int) -> bids.Plan:
  options = api.sampling_options(run, sampler=_SAMPLER.value, num_steps=_STEPS.value, eta=0.0)
  sampling = dict(options, timestep_spacing=generate.timestep_spacing(run.config,
                                                                      options["sampler"]),
                  per_sample_program=_PER_SAMPLE.value)
  return bids.Plan(names=run.stats.names,
                   covariates=covariates.draw_covariates(num, 0, run.stats, None),
                   source_ids=None, source="uniform", model={"RunDirectory": run.checkpoint},
                   sampling=sampling, seed=0, output_dtype=_DTYPE.value)


def time_sampling(sample, run, plan, mesh) -> tuple[float, list[np.ndarray]]:
  """Seconds for all subjects through the job's driver (one batch ahead), no writes."""
  volumes = []
  start = time.monotonic()
  for _, batch in sampling_lib.sample_batches(
      run, run.stats.normalise(plan.covariates), range(plan.num_subjects),
      key=jax.random.key(plan.seed), options=plan.sampling, batch_size=_BATCH.value, mesh=mesh,
      sampler_fn=sample):
    volumes.extend(batch)
  return time.monotonic() - start, volumes


def time_writing(volumes, run, plan, folder) -> float:
  start = time.monotonic()
  for i, volume in enumerate(volumes):
    bids.write_subject(folder, bids.subject_label(i), volume, run.affine,
                       files.json_text(plan.sidecar(i)), plan.output_dtype)
  return time.monotonic() - start


def main(argv):
  del argv
  ops.set_backend()
  run = make_run(_PRESET.value)
  plan = make_plan(run, _NUM_SUBJECTS.value)
  mesh = sampling_lib.local_mesh(run.config.mesh)
  sample = sampling_lib.make_sharded_sampler(run, mesh, plan.sampling)
  scratch = _OUT.value or tempfile.mkdtemp(prefix="benchmark_generate-")
  n = plan.num_subjects

  start = time.monotonic()
  warm = make_plan(run, _BATCH.value)
  time_sampling(sample, run, warm, mesh)
  compile_s = time.monotonic() - start

  sampling, writing, generation, waits = [], [], [], []
  for r in range(_REPEATS.value):
    seconds, volumes = time_sampling(sample, run, plan, mesh)
    sampling.append(seconds / n)
    folder = os.path.join(scratch, f"write-{r}")
    writing.append(time_writing(volumes, run, plan, folder) / n)
    shutil.rmtree(folder)
    folder = os.path.join(scratch, f"generate-{r}")
    summary = generate.generate_subjects(run, plan, folder, mesh=mesh,
                                         batch_size=_BATCH.value,
                                         writer_threads=_WRITERS.value, sampler_fn=sample,
                                         progress_every_s=1e9)
    assert summary.generated == n, summary
    generation.append(summary.wall_s / n)
    waits.append(summary.writer_wait_s)
    shutil.rmtree(folder)

  med = min
  c = run.config
  print(f"\npreset {_PRESET.value}: image {tuple(c.data.shape)}, {_SAMPLER.value} "
        f"{_STEPS.value} steps, {n} subjects, batch {_BATCH.value} on "
        f"{sharding_lib.num_batch_shards(mesh)} {jax.devices()[0].platform} device(s), "
        f"per_sample_program={_PER_SAMPLE.value}, {_DTYPE.value}, {_WRITERS.value} writer "
        f"threads, best of {_REPEATS.value}; compile + first batch {compile_s:.1f} s")
  rows = [("pure sampling", sampling), ("write only (serial)", writing),
          ("generation (sampling + writing)", generation)]
  print(f"{'':34s}{'best s/subj':>12s}{'median':>10s}{'runs':>30s}")
  for name, values in rows:
    print(f"{name:34s}{med(values):12.3f}{statistics.median(values):10.3f}"
          f"{'  '.join(f'{v:.3f}' for v in values):>30s}")
  print(f"{'generation / sampling':34s}{med(generation) / med(sampling):12.3f}"
        f"{statistics.median(generation) / statistics.median(sampling):10.3f}   (writer queue "
        f"full for {max(waits):.2f} s at most)")
  if not _OUT.value:
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
