"""Stopping a training run from outside: SIGTERM (a preemption notice) to one process or to one
of two, a loss that overflows, and a peer that dies; through the real CLI, in subprocesses.

Split from tests/test_train.py (whose helpers and cohort it uses) so that pytest's workers run
the two files side by side.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import jax
import numpy as np

from brain_ldm_jax.train import checkpoint as checkpoint_lib
from test_train import (AE_ONLY, REPO, TIMEOUT, _assert_trees, _command, _env, _params, _steps,
                        _two_processes, _wait_all, _wait_for_checkpoint, cohort)  # noqa: F401


def test_sigterm_leaves_a_complete_checkpoint(cohort, tmp_path):
  workdir = str(tmp_path / "preempted")
  proc = subprocess.Popen(_command(workdir, cohort, ("--config.train_ae.num_steps=1000", AE_ONLY)),
                          cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  _wait_for_checkpoint(workdir, "autoencoder", proc, at_least=2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=TIMEOUT)
  assert proc.returncode == 0, err[-3000:]
  assert "SIGTERM" in err
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "autoencoder"))
  try:
    step = ckpt.latest_step()
    assert 2 <= step < 1000
    state = ckpt.restore_state_only(None, step)
  finally:
    ckpt.close()
  assert int(state["step"]) == step



def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(cohort, tmp_path):
  workdir = str(tmp_path / "diverged")
  # An absurd learning rate makes the second step's loss overflow.
  result = subprocess.run(
      _command(workdir, cohort, ("--config.train_ae.learning_rate=1e35",
                                 "--config.train_ae.num_steps=6", AE_ONLY)),
      cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=TIMEOUT)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "non-finite" in result.stderr
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "autoencoder"))
  try:
    step = ckpt.latest_step()
    assert step is not None and step < 6
    state = ckpt.restore_state_only(None, step)
  finally:
    ckpt.close()
  for leaf in jax.tree.leaves(state["params"]):
    assert np.all(np.isfinite(leaf))


# ----------------------------------------------------------------------------------------------
# Two processes: preemption and a lost peer


def _launched_python(proc) -> int:
  """The pid of the launched `brain_ldm_jax.main` under a `timeout` prefix (what a scheduler
  signals)."""
  with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
    return int(f.read().split()[0])


def _wait_for_step(workdir, stage, started, at_least):
  """Until `stage` has a checkpoint of at least step `at_least` (all processes still running)."""
  directory = os.path.join(workdir, stage)
  deadline = time.time() + TIMEOUT
  while time.time() < deadline and all(proc.poll() is None for proc, _ in started):
    if os.path.isdir(directory):
      steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
      if steps and max(steps) >= at_least:
        return
    time.sleep(0.05)
  logs = []
  for _, log in started:
    log.seek(0)
    logs.append(log.read()[-2000:])
  raise AssertionError(f"no checkpoint of {stage} at step {at_least}: {logs}")


def _finish(started) -> list[tuple[int, str]]:
  """(exit status, stderr) of each run, once all have ended."""
  results = []
  try:
    for proc, log in started:
      proc.wait(timeout=TIMEOUT)
      log.seek(0)
      results.append((proc.returncode, log.read()))
  finally:
    for proc, log in started:
      proc.kill()
      proc.wait()
      log.close()
  return results


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(cohort, tmp_path):
  root = str(tmp_path)
  preempted = os.path.join(root, "preempted")
  started = _two_processes(preempted, cohort, ("--config.train_ae.num_steps=1000", AE_ONLY))
  _wait_for_step(preempted, "autoencoder", started, at_least=1)
  os.kill(_launched_python(started[1][0]), signal.SIGTERM)  # one process of the two
  results = _finish(started)
  stops = []
  for code, err in results:
    assert code == 0, err[-3000:]
    stops.append([int(s) for s in re.findall(r"autoencoder preempted at step (\d+)", err)])
  assert stops[0] == stops[1] and len(stops[0]) == 1, stops
  stop = stops[0][0]
  assert _steps(preempted, "autoencoder")[-1] == stop < 1000

  # Resumed to two steps past the stop vs the same training uninterrupted: the same state.
  uninterrupted = os.path.join(root, "uninterrupted")
  steps = (f"--config.train_ae.num_steps={stop + 2}", AE_ONLY)
  _wait_all(_two_processes(preempted, cohort, steps) + _two_processes(uninterrupted, cohort, steps))
  _assert_trees(_params(preempted, "autoencoder"), _params(uninterrupted, "autoencoder"),
                exact=True)


def test_lost_peer_stops_the_survivor_with_one_line(cohort, tmp_path):
  workdir = str(tmp_path / "lost_peer")
  heartbeat_timeout_s = 5
  started = _two_processes(workdir, cohort, ("--config.train_ae.num_steps=1000", AE_ONLY),
                           heartbeat_timeout_s=heartbeat_timeout_s)
  _wait_for_step(workdir, "autoencoder", started, at_least=1)
  os.kill(_launched_python(started[1][0]), signal.SIGKILL)
  survivor = started[0][0]
  try:
    # JAX's default would take 100 s; generous slack for a loaded machine.
    survivor.wait(timeout=heartbeat_timeout_s + 120)
  finally:
    _finish(started)
  assert survivor.returncode == 1
  log = open(f"{workdir}.0.stderr").read()
  last = log.strip().splitlines()[-1]
  assert last.startswith("error: process 0 lost process 1 of the multi-host run"), log[-3000:]
  assert "Traceback" not in log and "stack trace" not in log and " @ " not in log, log[-3000:]
