"""Training end to end through the real CLI, in subprocesses with forced CPU devices (stopping a
run from outside: tests/test_train_signals.py).

Each run trains the tiny `test` preset for a few steps; the tests compare the parameters that
different device layouts, process counts, interruptions and restarts produce.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from brain_ldm_jax import presets
from brain_ldm_jax.data import synthetic
from brain_ldm_jax.train import checkpoint as checkpoint_lib
from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600

# A few steps of each stage, the adversarial loss on from the start (one AE program to compile),
# the autoencoder on random crops (so layouts, processes and restarts must all crop alike), a
# checkpoint per step, a two-level UNet (these tests are about layouts and restarts; a smaller
# program compiles in half the time).
BASE_FLAGS = (
    "--config.train_ae.num_steps=3", "--config.train_ae.adv_start_step=0",
    "--config.train_ae.batch_size=4", "--config.train_ae.checkpoint_every=1",
    "--config.train_ae.patch_shape=(16,16,16)", "--config.train_ae.clip_reconstruction=true",
    "--config.train_ldm.num_steps=3", "--config.train_ldm.batch_size=4",
    "--config.train_ldm.checkpoint_every=1",
    "--config.stages=('autoencoder','ldm')",
    "--config.unet.channels=(8,8)", "--config.unet.attention_levels=(False,True)",
    "--config.unet.num_head_channels=(0,8)",
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  config = presets.base_config("test")
  out = str(tmp_path_factory.mktemp("cohort"))
  synthetic.make_cohort(out, num_subjects=8, seed=0, spacing=config.data.spacing,
                        shape=tuple(config.data.shape))
  return out


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(devices)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _command(workdir, cohort, extra=()):
  # A second --config.stages would extend the first's tuple, not replace it: `extra`'s wins.
  overridden = {f.split("=")[0] for f in extra if f.startswith("--config.stages=")}
  base = [f for f in BASE_FLAGS if f.split("=")[0] not in overridden]
  return [sys.executable, "-m", "brain_ldm_jax.main", "--config=configs/ldm.py:test",
          f"--workdir={workdir}", f"--config.data.data_dir={cohort}", *base, *extra]


def _train(workdir, cohort, devices=1, extra=()):
  _wait_all([_start(workdir, cohort, devices, extra)])


def _start(workdir, cohort, devices, extra=(), prefix=(), log_path=None):
  """A training run in the background, its stderr in a file beside the workdir. Its programs go
  to the session's compilation cache (tests/conftest.py): runs that repeat one compile it once."""
  log = open(log_path or workdir.rstrip("/") + ".stderr", "w+")
  proc = subprocess.Popen([*prefix, *_command(workdir, cohort, extra)], cwd=REPO,
                          env=_env(devices), stdout=subprocess.DEVNULL, stderr=log)
  return proc, log


def _wait_all(started):
  """Waits for runs that `_start` started, side by side: each spends most of its time compiling,
  on one core, so two of them take little longer than one."""
  try:
    for proc, log in started:
      proc.wait(timeout=TIMEOUT)
      log.seek(0)
      assert proc.returncode == 0, log.read()[-4000:]
  finally:
    for proc, log in started:
      proc.kill()  # the others, once one has failed
      proc.wait()
      log.close()


def _params(workdir, stage, step=None):
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, stage))
  try:
    state = ckpt.restore_state_only(None, step)
  finally:
    ckpt.close()
  return jax.tree.map(np.asarray, state)


def _steps(workdir, stage) -> list[int]:
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, stage))
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


def _assert_trees(a, b, exact: bool):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    if exact:
      np.testing.assert_array_equal(x, y)
    else:
      # Float32 summation order differs with the device and process layout (each device sums its
      # own examples' kernel gradients, then an all-reduce): after a few Adam steps, parameters near
      # zero differ by a few 1e-6.
      np.testing.assert_allclose(x, y, rtol=2e-4, atol=5e-6)


@pytest.fixture(scope="module")
def device_runs(cohort, tmp_path_factory):
  """Workdirs of the same training on one and on four devices, by device count."""
  root = tmp_path_factory.mktemp("device_runs")
  workdirs = {n: str(root / f"{n}_devices") for n in (1, 4)}
  _wait_all([_start(workdirs[n], cohort, n) for n in workdirs])
  return workdirs


@pytest.fixture(scope="module")
def one_device_run(device_runs):
  return device_runs[1]


@pytest.fixture(scope="module")
def four_device_run(device_runs):
  return device_runs[4]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, cohort, extra=(), heartbeat_timeout_s=None):
  """The same training as two processes of two devices each, started side by side; their logs
  go to WORKDIR.0.stderr and WORKDIR.1.stderr."""
  port = _free_port()
  started = []
  for i in range(2):
    flags = (f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}")
    if heartbeat_timeout_s is not None:
      flags += (f"--heartbeat_timeout_s={heartbeat_timeout_s}",)
    # A hung collective would outlive pytest's own timeout: a hard limit on each process.
    started.append(_start(workdir, cohort, 2, (*flags, *extra),
                          prefix=("timeout", "-s", "KILL", str(TIMEOUT)),
                          log_path=f"{workdir}.{i}.stderr"))
  return started


# Every periodic hook of both stages within the 3 steps: scalars, images and checkpoints at step 2
# (and at the first and last steps, as always).
EVERY_HOOK = tuple(f"--config.{stage}.{hook}=2" for stage in ("train_ae", "train_ldm")
                   for hook in ("log_every", "image_every", "checkpoint_every"))


@pytest.fixture(scope="module")
def layout_runs(cohort, four_device_run, tmp_path_factory):
  """The four-device training again, side by side: with the UNet sharded over two of the devices
  (fsdp), and as two processes of two devices each with every periodic hook on."""
  root = tmp_path_factory.mktemp("layout_runs")
  fsdp, two_processes = str(root / "fsdp"), str(root / "two_processes")
  # The finished autoencoder is reused (the stage is skipped): the UNet is what fsdp is for.
  shutil.copytree(os.path.join(four_device_run, "autoencoder"), os.path.join(fsdp, "autoencoder"))
  shutil.copy(os.path.join(four_device_run, "run.json"), fsdp)
  started = [_start(fsdp, cohort, 4, ("--config.mesh.fsdp=2", "--config.mesh.fsdp_min_size=64"))]
  started += _two_processes(two_processes, cohort, EVERY_HOOK)
  _wait_all(started)
  return {"fsdp": fsdp, "two_processes": two_processes}


def test_four_devices_equal_one_device(one_device_run, four_device_run):
  for stage in ("autoencoder", "ldm"):
    _assert_trees(_params(one_device_run, stage)["params"],
                  _params(four_device_run, stage)["params"], exact=False)
  ldm = _params(one_device_run, "ldm")
  assert int(ldm["step"]) == 3
  assert not np.allclose(ldm["params"]["conv_in"]["kernel"],
                         ldm["ema_params"]["conv_in"]["kernel"]), "EMA should lag the params"


def test_fsdp_sharded_equals_replicated(four_device_run, layout_runs):
  _assert_trees(_params(layout_runs["fsdp"], "ldm"), _params(four_device_run, "ldm"), exact=False)


def _summaries(logdir) -> dict[str, set[int]]:
  """tag -> steps of the TensorBoard event files in `logdir` (TFRecord framing read here)."""
  from tensorboardX.proto import event_pb2
  found = {}
  for name in os.listdir(logdir):
    if "tfevents" not in name:
      continue
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        found.setdefault(value.tag, set()).add(event.step)
  return found


def test_two_processes_equal_one_process(four_device_run, layout_runs):
  workdir = layout_runs["two_processes"]
  for stage in ("autoencoder", "ldm"):
    _assert_trees(_params(workdir, stage), _params(four_device_run, stage), exact=False)
    # Every periodic hook ran: checkpoints at step 2 and the last, scalars at 1, 2 and 3.
    assert _steps(workdir, stage) == [2, 3]
    summaries = _summaries(os.path.join(workdir, stage))
    assert summaries["loss"] == {1, 2, 3}, summaries
  images = _summaries(os.path.join(workdir, "autoencoder"))["inputs_then_reconstructions"]
  assert images == {2}


def _wait_for_checkpoint(workdir, stage, proc, at_least=1):
  deadline = time.time() + TIMEOUT
  directory = os.path.join(workdir, stage)
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(directory):
      steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
      if steps and max(steps) >= at_least:
        return
    time.sleep(0.05)
  raise AssertionError(f"no checkpoint of {stage} appeared; stderr: {proc.stderr.read()[-3000:]}")


AE_ONLY = "--config.stages=('autoencoder',)"


def test_kill_and_resume_is_bit_identical(cohort, one_device_run, tmp_path):
  workdir = str(tmp_path / "killed")
  proc = subprocess.Popen(_command(workdir, cohort, (AE_ONLY,)), cwd=REPO, env=_env(1),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_checkpoint(workdir, "autoencoder", proc, at_least=1)
  proc.kill()
  proc.wait()
  _train(workdir, cohort, devices=1, extra=(AE_ONLY,))
  # Params, optimizer, discriminator, BatchNorm statistics, step and RNG: all of the state.
  _assert_trees(_params(workdir, "autoencoder"), _params(one_device_run, "autoencoder"),
                exact=True)
