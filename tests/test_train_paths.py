"""Training paths the layout tests do not reach: the perceptual loss in a real job, the LDM stage's
kill/resume on cached latents, the paper preset's `cache_latents=False` path, and FSDP's layout.

Runs the CLI in subprocesses like tests/test_train.py (whose helpers it uses): one whole run, then
the LDM stage three times from its autoencoder: uninterrupted, killed and resumed, and without the
latent cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from test_perceptual import write_medicalnet_file
from test_train import (REPO, TIMEOUT, _assert_trees, _command, _env, _params, _start, _wait_all,
                        _wait_for_checkpoint, cohort)  # noqa: F401  (cohort: a fixture)

NO_CACHE = "--config.train_ldm.cache_latents=False"
# More LDM steps than tests/test_train.py runs, each checkpointed: the kill lands mid-stage.
LDM_STEPS = 8


@pytest.fixture(scope="module")
def perceptual_run(cohort, tmp_path_factory):  # noqa: F811
  """Both stages with the perceptual loss on (random-weight MedicalNet file); its stderr."""
  root = tmp_path_factory.mktemp("paths")
  weights = write_medicalnet_file(str(root / "resnet_10.pth"))
  workdir = str(root / "whole")
  flags = (f"--config.train_ae.perceptual_weights_path={weights}",
           f"--config.train_ldm.num_steps={LDM_STEPS}")
  _wait_all([_start(workdir, cohort, 1, flags)])
  with open(workdir + ".stderr") as f:
    return dict(workdir=workdir, flags=flags, stderr=f.read())


def _from_autoencoder(source: str, workdir: str) -> str:
  """A workdir whose autoencoder stage is the finished one of `source`: only the LDM trains."""
  shutil.copytree(os.path.join(source, "autoencoder"), os.path.join(workdir, "autoencoder"))
  shutil.copy(os.path.join(source, "run.json"), workdir)
  return workdir


@pytest.fixture(scope="module")
def ldm_runs(cohort, perceptual_run, tmp_path_factory):  # noqa: F811
  """The LDM stage again from the finished autoencoder: uninterrupted, killed after its first
  checkpoint and resumed, and without the latent cache."""
  root = tmp_path_factory.mktemp("ldm_runs")
  source, flags = perceptual_run["workdir"], perceptual_run["flags"]
  whole, killed, uncached = (_from_autoencoder(source, str(root / name))
                             for name in ("whole", "killed", "uncached"))
  started = [_start(whole, cohort, 1, flags), _start(uncached, cohort, 1, (*flags, NO_CACHE))]
  proc = subprocess.Popen(_command(killed, cohort, flags), cwd=REPO, env=_env(1),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_checkpoint(killed, "ldm", proc, at_least=1)
  finally:
    proc.kill()
    proc.communicate()
  steps = [int(d) for d in os.listdir(os.path.join(killed, "ldm")) if d.isdigit()]
  started.append(_start(killed, cohort, 1, flags))
  _wait_all(started)
  logs = {}
  for name, workdir in (("killed", killed), ("uncached", uncached)):
    with open(workdir + ".stderr") as f:
      logs[name] = f.read()
  return dict(whole=whole, killed=killed, uncached=uncached, steps_before_kill=steps, logs=logs)


def test_the_job_trains_with_the_perceptual_loss(perceptual_run):
  err = perceptual_run["stderr"]
  assert "perceptual loss on: MedicalNet features from" in err
  values = [float(v) for v in re.findall(r"autoencoder \d+/\d+ \|.* perceptual=([0-9.e+-]+)", err)]
  assert values and all(v > 0 for v in values), err[-3000:]


def test_ldm_kill_and_resume_on_cached_latents_is_bit_identical(ldm_runs):
  assert ldm_runs["steps_before_kill"] and max(ldm_runs["steps_before_kill"]) < LDM_STEPS, (
      "the kill came after the last step: nothing was resumed")
  log = ldm_runs["logs"]["killed"]
  assert "autoencoder: finished" in log and "ldm: resumed from step" in log, log[-3000:]
  assert "training subjects once" in log  # the cached path, encoded again on resuming
  # Params, EMA, optimizer moments, step and RNG key: all of the LDM state.
  _assert_trees(_params(ldm_runs["killed"], "ldm"), _params(ldm_runs["whole"], "ldm"), exact=True)


def test_ldm_without_the_latent_cache_matches_the_cached_path(ldm_runs):
  # The paper preset encodes each batch in the step (cache_latents=False); with latent="mean"
  # that is the cached path's training up to the encoder's float rounding at another batch size.
  assert "training subjects once" not in ldm_runs["logs"]["uncached"]
  uncached = _params(ldm_runs["uncached"], "ldm")
  assert int(uncached["step"]) == LDM_STEPS
  _assert_trees(uncached["params"], _params(ldm_runs["whole"], "ldm")["params"], exact=False)


FSDP_SCRIPT = r"""
import json, sys
import jax, numpy as np
from brain_ldm_jax import presets, sharding
from brain_ldm_jax.train import ldm

config = presets.base_config("test")
config.mesh.fsdp, config.mesh.fsdp_min_size = 2, int(sys.argv[1])
mesh = sharding.make_mesh(config.mesh)
state = ldm.build(config, mesh, jax.random.key(0))["init"]()
leaves = []
for path, leaf in jax.tree_util.tree_leaves_with_path(state):
  full = np.asarray(leaf)
  leaves.append(dict(
      path=jax.tree_util.keystr(path), shape=list(leaf.shape),
      spec=[None if s is None else str(s) for s in leaf.sharding.spec],
      shards=[list(s.data.shape) for s in leaf.addressable_shards],
      # Each device holds its own slice of the array, not a copy of all of it.
      slices_match=all(np.array_equal(np.asarray(s.data), full[s.index])
                       for s in leaf.addressable_shards)))
print(json.dumps(dict(mesh=dict(mesh.shape), leaves=leaves)))
"""


def test_fsdp_shards_large_parameters_and_their_optimizer_state():
  min_size = 1024
  result = subprocess.run([sys.executable, "-c", FSDP_SCRIPT, str(min_size)], cwd=REPO,
                          env=_env(4), capture_output=True, text=True, timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["mesh"] == {"data": 2, "fsdp": 2}
  sharded = []
  for leaf in out["leaves"]:
    shape, spec, shards = leaf["shape"], leaf["spec"], leaf["shards"]
    assert leaf["slices_match"], leaf["path"]
    assert len(shards) == 4
    if int(np.prod(shape)) >= min_size and any(d % 2 == 0 for d in shape):
      assert spec.count("fsdp") == 1, leaf
      dim = spec.index("fsdp")
      half = shape[:dim] + [shape[dim] // 2] + shape[dim + 1:]
      assert all(s == half for s in shards), leaf
      sharded.append(leaf["path"])
    else:
      assert not any(spec), leaf
      assert all(s == shape for s in shards), leaf
  kinds = {re.match(r"\.(\w+)", p).group(1) for p in sharded}
  # Parameters, their EMA and both Adam moments are split, not only the parameters.
  assert {"params", "ema_params", "opt_state"} <= kinds, kinds
  assert any("mu" in p for p in sharded) and any("nu" in p for p in sharded)


def test_ldm_after_a_finished_autoencoder_matches_the_same_process(perceptual_run, ldm_runs):
  # Training the LDM right after the autoencoder, in one process, or in a new process from the
  # stored autoencoder: the same stage.
  _assert_trees(_params(ldm_runs["whole"], "ldm"), _params(perceptual_run["workdir"], "ldm"),
                exact=False)
