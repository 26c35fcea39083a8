"""Telling the user how training goes: TensorBoard event files and a console line with ETA.

TensorBoard files are written with tensorboardX behind jax-loop-utils' MetricWriter interface, so
no TensorFlow is needed. Only process 0 writes; other processes get a writer that does nothing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax_loop_utils.metric_writers import interface
from jax_loop_utils.metric_writers import noop_writer


class TensorBoardWriter(interface.MetricWriter):
  """Scalars, images (H, W, C uint8 or float in [0, 1]), texts and hparams as event files."""

  def __init__(self, logdir: str):
    import tensorboardX  # imported here: only process 0 pays for it
    self._writer = tensorboardX.SummaryWriter(logdir=logdir)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for key, value in scalars.items():
      self._writer.add_scalar(key, float(value), global_step=step)

  def write_images(self, step: int, images: Mapping[str, Any]):
    for key, value in images.items():
      value = np.asarray(value)
      if value.ndim == 2:  # grayscale montage
        value = value[..., None]
      self._writer.add_image(key, value, global_step=step, dataformats="HWC")

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    raise NotImplementedError("videos are not written by this project")

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    raise NotImplementedError("audio is not written by this project")

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for key, value in texts.items():
      self._writer.add_text(key, value, global_step=step)

  def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets=None):
    for key, value in arrays.items():
      self._writer.add_histogram(key, np.asarray(value), global_step=step)

  def write_hparams(self, hparams: Mapping[str, Any]):
    text = "\n".join(f"    {k}: {v}" for k, v in sorted(hparams.items()))
    self._writer.add_text("hparams", text, global_step=0)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def make_writer(logdir: str) -> interface.MetricWriter:
  if jax.process_index() != 0:
    return noop_writer.NoOpWriter()
  return TensorBoardWriter(logdir)


def format_duration(seconds: float) -> str:
  seconds = int(round(max(seconds, 0)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
  """steps/s and ETA over the steps run in this process (not counting the first, compiling one)."""

  def __init__(self, name: str, first_step: int, last_step: int):
    self.name = name
    self.last_step = last_step
    self._t0 = None
    self._step0 = first_step

  def line(self, step: int, scalars: Mapping[str, float]) -> str:
    now = time.perf_counter()
    if self._t0 is None or step <= self._step0:
      self._t0, self._step0 = now, step
      rate = float("nan")
    else:
      rate = (step - self._step0) / (now - self._t0)
    eta = (self.last_step - step) / rate if rate == rate and rate > 0 else float("nan")
    values = " ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items()))
    timing = (f"{rate:.2f} steps/s, ETA {format_duration(eta)}" if eta == eta
              else "timing after the next log")
    return f"{self.name} {step}/{self.last_step} | {values} | {timing}"

  def report(self, step: int, scalars: Mapping[str, float]) -> None:
    if jax.process_index() == 0:
      logging.info("%s", self.line(step, scalars))
