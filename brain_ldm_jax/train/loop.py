"""The training loop both stages share: resume, step, log, image summaries, checkpoint, stop.

A stage supplies its jitted pure step and its state; the loop owns everything around it:
  - resume from the latest finished checkpoint (state, data position, RNG), or start fresh;
  - skip entirely when the stage's final checkpoint exists;
  - metrics merged on device (clu.metrics), read back only when logged;
  - a non-finite loss stops the run before anything non-finite is saved;
  - SIGTERM (preemption) saves a checkpoint at the current step and exits cleanly; in a
    multi-process run every process stops at the same agreed step.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from brain_ldm_jax.errors import UserError
from brain_ldm_jax.train import checkpoint as checkpoint_lib
from brain_ldm_jax.train import reporting


class TrainingDiverged(UserError):
  """A non-finite loss; the last good checkpoint is kept."""


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint at the current step was written."""


@dataclasses.dataclass
class Stage:
  """What a training stage gives the loop."""
  name: str
  directory: str
  num_steps: int
  log_every: int
  checkpoint_every: int
  image_every: int
  keep_checkpoints: int
  init_state: Callable[[], Any]  # -> state, laid out on the mesh
  abstract_state: Any  # ShapeDtypeStructs with shardings, for restoring
  # (state, batch, step) -> (state, metrics); `step` (a Python int, the step being taken) lets a
  # stage switch between compiled variants, e.g. before and after the adversarial warm-up.
  train_step: Callable[[Any, dict, int], tuple[Any, Any]]
  meta: dict  # stored with every checkpoint (config, covariate statistics, ...)
  images: Callable[[Any, dict], dict[str, np.ndarray]] | None = None  # state, batch -> HWC images


class _StopFlag:
  """Whether to stop for a preemption (SIGTERM) at a step; asked between steps, so a save never
  races a step.

  One process: our own SIGTERM handler. Several: after jax.distributed.initialize, JAX's
  preemption notifier owns SIGTERM, and its sync point has every process stop at the same step
  (one past the highest step any process had reached when one got the signal), so that all take
  the one collective checkpoint together. It must be asked at every step, from the same first
  step in every process; between notices it is a local check, no communication.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    self._agreed = jax.process_count() > 1

  def __enter__(self):
    if not self._agreed and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    if self._agreed:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()


def _check_finite(scalars: dict[str, float], stage: str, step: int, directory: str,
                  last_saved: int | None) -> None:
  bad = [k for k, v in scalars.items() if not math.isfinite(v)]
  if bad:
    kept = (f"the last good checkpoint (step {last_saved}) in {directory} is intact"
            if last_saved is not None else "no checkpoint had been written yet")
    raise TrainingDiverged(
        f"{stage}: non-finite {', '.join(bad)} at step {step}; stopping. {kept}. "
        "Lower the learning rate or check the data for extreme values.")


def _needs_step_sync() -> bool:
  # Several CPU devices in one process can deadlock on back-to-back collectives unless each
  # step finishes first (measured on XLA:CPU with gloo). Accelerators keep steps in flight.
  return jax.default_backend() == "cpu" and jax.local_device_count() > 1


def run_stage(stage: Stage, batches: Iterator[dict], data_iterator=None,
              writer=None) -> Any:
  """Trains `stage` to `num_steps` and returns the final state.

  `batches` yields global (sharded) batches; `data_iterator` is the underlying grain iterator whose
  position is checkpointed (None: not checkpointed, e.g. when batches are derived from the step).
  """
  ckpt = checkpoint_lib.Checkpointer(stage.directory, keep=stage.keep_checkpoints)
  writer = writer or reporting.make_writer(stage.directory)
  try:
    # A finished stage's checkpoint need not hold a data position (converted weights do not).
    latest = ckpt.latest_step()
    finished = latest is not None and latest >= stage.num_steps
    # Damaged newer steps are warned about and set aside: training redoes them.
    found = ckpt.restore_newest_intact(stage.abstract_state, None if finished else data_iterator,
                                       set_aside=True)
    if found is not None and found[0] >= stage.num_steps:
      logging.info("%s: finished (checkpoint at step %d), skipping", stage.name, found[0])
      return found[1]
    if found is None:
      state, start, latest = stage.init_state(), 0, None
    else:
      start, state = found
      if finished and data_iterator is not None:  # fell back from the final step
        state, _ = ckpt.restore(start, stage.abstract_state, data_iterator)
      latest = start
      logging.info("%s: resumed from step %d", stage.name, start)
    state = _train(stage, state, start, batches, data_iterator, ckpt, writer, latest)
    ckpt.wait()
    return state
  finally:
    writer.flush()
    ckpt.close()


def _train(stage, state, start, batches, data_iterator, ckpt, writer, last_saved):
  progress = reporting.Progress(stage.name, start, stage.num_steps)
  metrics = None
  sync = _needs_step_sync()
  with _StopFlag() as stop:
    for step in range(start + 1, stage.num_steps + 1):
      batch = next(batches)
      state, step_metrics = stage.train_step(state, batch, step)
      metrics = step_metrics if metrics is None else metrics.merge(step_metrics)
      if sync:
        jax.block_until_ready(step_metrics)

      is_last = step == stage.num_steps
      stopping = stop.reached(step)
      if step % stage.log_every == 0 or is_last or step == start + 1:
        scalars = {k: float(v) for k, v in metrics.compute().items()}
        _check_finite(scalars, stage.name, step, stage.directory, last_saved)
        writer.write_scalars(step, scalars)
        progress.report(step, scalars)
        metrics = None
      if stage.images is not None and step % stage.image_every == 0:
        writer.write_images(step, stage.images(state, batch))
      if step % stage.checkpoint_every == 0 or is_last or stopping:
        if metrics is not None:  # never save past an unchecked non-finite step
          scalars = {k: float(v) for k, v in metrics.compute().items()}
          _check_finite(scalars, stage.name, step, stage.directory, last_saved)
        ckpt.save(step, state, stage.meta, data_iterator)
        last_saved = step
      if stopping:
        ckpt.wait()
        writer.flush()
        logging.warning("%s: SIGTERM at step %d; checkpoint saved. Rerun the same command to "
                        "resume.", stage.name, step)
        raise Preempted(f"{stage.name} preempted at step {step}")
  return state
