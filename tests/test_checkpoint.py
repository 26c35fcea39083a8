"""Checkpoint integrity: damaged steps are noticed, never loaded; jobs and load_run fall back.

Each kind of damage is done to the newest of three steps of a small state: a truncated or
overwritten array data file, garbage in the array metadata or the step metadata, a step without
digests, and single-bit flips spread over the array data. Every one must be noticed (the restore
raises or the values differ from their digests), and the newest intact step is used instead.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from brain_ldm_jax import api
from brain_ldm_jax import files
from brain_ldm_jax import presets
from brain_ldm_jax import run_dir
from brain_ldm_jax.data import manifest
from brain_ldm_jax.data import nifti
from brain_ldm_jax.data import synthetic
from brain_ldm_jax.errors import DataError
from brain_ldm_jax.train import checkpoint as checkpoint_lib
from brain_ldm_jax.train import ldm as ldm_lib
from brain_ldm_jax.train import loop
from random_weights import random_params
from conftest import xla_flags
from test_train import AE_ONLY, _command, _env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = (2, 3, 4)  # keep=3 of a 4-step run
NUM_FLIPS = 8


def _state(step: int):
  """A small LDM-shaped train state whose values depend on the step (Adam moments included)."""
  rng = np.random.default_rng(step)
  params = {"conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 3, 8, 16)), jnp.float32),
                     "bias": jnp.asarray(rng.standard_normal(16), jnp.float32)}}
  tx = optax.adam(1e-3)
  opt_state = tx.update(params, tx.init(params), params)[1]
  return ldm_lib.LDMState(step=jnp.asarray(step, jnp.int32), params=params,
                          ema_params=jax.tree.map(lambda p: 0.5 * p, params),
                          opt_state=opt_state, key=jax.random.key_data(jax.random.key(step)))


def _abstract():
  return jax.eval_shape(lambda: _state(0))


def _by_path(tree) -> dict:
  """{'opt_state/0/mu/conv/kernel': value}: a state dataclass and its restored dict form alike."""
  def name(key):
    return str(next(getattr(key, a) for a in ("key", "name", "idx") if hasattr(key, a)))
  return {"/".join(map(name, path)): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_equal(a, b):
  a, b = _by_path(a), _by_path(b)
  assert sorted(a) == sorted(b)
  for name, value in a.items():
    np.testing.assert_array_equal(value, b[name], err_msg=name)


# Damage, done to one step directory.


def _data_files(step_dir: str) -> list[str]:
  """The state's array data files, largest first."""
  d = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
  return sorted((os.path.join(d, f) for f in os.listdir(d)), key=os.path.getsize, reverse=True)


def _truncate(step_dir):
  path = _data_files(step_dir)[0]
  os.truncate(path, os.path.getsize(path) // 2)


def _overwrite(step_dir):
  path = _data_files(step_dir)[0]
  size = os.path.getsize(path)
  with open(path, "wb") as f:
    f.write(np.random.default_rng(0).bytes(size))


def _garbage(relative: str):
  def damage(step_dir):
    with open(os.path.join(step_dir, relative), "wb") as f:
      f.write(b"\xff\xfe\x00garbage\x9c" * 7)
  return damage


def _no_digests(step_dir):
  # A step metadata file as orbax writes it, without this project's digests (an older version).
  path = os.path.join(step_dir, checkpoint_lib.STEP_METADATA_FILE)
  with open(path, "rb") as f:
    text = f.read().decode()
  assert checkpoint_lib.DIGESTS_KEY in text
  with open(path, "w") as f:
    f.write(text.replace(checkpoint_lib.DIGESTS_KEY, "something_else"))


def _flip(index: int):
  """Flips one bit at the index-th of NUM_FLIPS offsets spread over the largest data file."""
  def damage(step_dir):
    path = _data_files(step_dir)[0]
    offset = (2 * index + 1) * os.path.getsize(path) // (2 * NUM_FLIPS)
    with open(path, "r+b") as f:
      f.seek(offset)
      byte = f.read(1)[0]
      f.seek(offset)
      f.write(bytes([byte ^ (1 << (index % 8))]))
  return damage


DAMAGE = {"truncated_chunk": _truncate, "overwritten_chunk": _overwrite,
          "array_metadata_garbage": _garbage("state/_METADATA"),
          "step_metadata_garbage": _garbage(checkpoint_lib.STEP_METADATA_FILE),
          "meta_item_garbage": _garbage("meta/metadata"),
          "no_digests": _no_digests,
          **{f"bit_flip_{i}": _flip(i) for i in range(NUM_FLIPS)}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A stage directory with steps 2, 3, 4 (saved asynchronously, as training does)."""
  directory = str(tmp_path_factory.mktemp("saved") / "ldm")
  ckpt = checkpoint_lib.Checkpointer(directory)
  try:
    for step in STEPS:
      ckpt.save(step, _state(step), {"step": step})
  finally:
    ckpt.close()
  return directory


def _damaged_copy(saved, tmp_path, kind) -> str:
  directory = str(tmp_path / "ldm")
  shutil.copytree(saved, directory)
  DAMAGE[kind](os.path.join(directory, str(STEPS[-1])))
  return directory


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_step_is_noticed_and_skipped(saved, tmp_path, kind, caplog):
  directory = _damaged_copy(saved, tmp_path, kind)
  ckpt = checkpoint_lib.Checkpointer(directory)
  try:
    with pytest.raises(checkpoint_lib.CheckpointDamaged, match=f"checkpoint step {STEPS[-1]} in "):
      ckpt.restore(STEPS[-1], _abstract())
    with caplog.at_level(logging.WARNING):
      step, state = ckpt.restore_newest_intact(_abstract())
  finally:
    ckpt.close()
  assert step == STEPS[-2]
  _assert_equal(state, _state(STEPS[-2]))
  assert f"ldm: checkpoint step {STEPS[-1]} in {directory} is damaged (" in caplog.text
  assert f"falling back to step {STEPS[-2]}" in caplog.text


def test_intact_steps_restore_in_any_layout(saved):
  ckpt = checkpoint_lib.Checkpointer(saved)
  try:
    for step in STEPS:
      _assert_equal(ckpt.restore(step, _abstract())[0], _state(step))
    _assert_equal(ckpt.restore_state_only(), _state(STEPS[-1]))
    step, ema = ckpt.restore_subtree("ema_params")
  finally:
    ckpt.close()
  assert step == STEPS[-1]
  _assert_equal(ema, _state(STEPS[-1]).ema_params)


def test_no_intact_step_is_one_error_naming_the_directory(saved, tmp_path):
  directory = str(tmp_path / "ldm")
  shutil.copytree(saved, directory)
  for step in STEPS:
    _truncate(os.path.join(directory, str(step)))
  ckpt = checkpoint_lib.Checkpointer(directory)
  try:
    with pytest.raises(DataError, match=f"no intact checkpoint in {directory}: step 4: .*step 2"):
      ckpt.restore_newest_intact(_abstract())
  finally:
    ckpt.close()


# The job: run_stage resumes (or skips a finished stage) from the newest intact step.


def _stage(directory: str, num_steps: int) -> loop.Stage:
  def train_step(state, batch, step):
    del batch
    new = state.replace(step=state.step + 1, params=jax.tree.map(lambda p: p + 1.0, state.params))
    return new, ldm_lib.LDMMetrics.single_from_model_output(loss=jnp.float32(step))

  return loop.Stage(name="ldm", directory=directory, num_steps=num_steps, log_every=100,
                    checkpoint_every=1, image_every=1000, keep_checkpoints=3,
                    init_state=lambda: _state(0), abstract_state=_abstract(),
                    train_step=train_step, meta={})


def _run(directory, num_steps):
  return loop.run_stage(_stage(directory, num_steps), itertools.repeat({}))


@pytest.mark.parametrize("kind", ["truncated_chunk", "array_metadata_garbage", "bit_flip_3"])
@pytest.mark.parametrize("num_steps", [4, 6], ids=["finished", "resumed"])
def test_job_falls_back_and_goes_on(tmp_path, kind, num_steps, caplog):
  reference = _run(str(tmp_path / "reference" / "ldm"), num_steps)
  directory = str(tmp_path / "damaged" / "ldm")
  _run(directory, 4)
  DAMAGE[kind](os.path.join(directory, "4"))
  with caplog.at_level(logging.WARNING):
    state = _run(directory, num_steps)  # redoes step 4 (the data here depend on the step only)
  assert f"ldm: checkpoint step 4 in {directory} is damaged (" in caplog.text
  assert "falling back to step 3" in caplog.text
  _assert_equal(state, reference)
  assert os.listdir(os.path.join(directory, checkpoint_lib.SET_ASIDE_DIR))[0].startswith("4-")
  # What it saved after the fallback is listed and intact.
  ckpt = checkpoint_lib.Checkpointer(directory)
  try:
    assert ckpt.latest_step() == num_steps
    _assert_equal(ckpt.restore(num_steps, _abstract())[0], reference)
  finally:
    ckpt.close()


# load_run: only what sampling needs, verified, with the same fallback.

STATS = manifest.CovariateStats(presets.COVARIATES, (45.0, 0.0, 10.0, 1000.0),
                                (80.0, 1.0, 120.0, 1500.0))


@pytest.fixture(scope="module")
def run_with_two_ldm_steps(tmp_path_factory):
  """A sampling-ready run whose LDM has a final step and a later one with other weights."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = presets.base_config("test")
  params = random_params(config)
  api.save_run(workdir, config, params, STATS, 1.0,
               nifti.mni_affine(config.data.shape, config.data.spacing))
  later = random_params(config, seed=1)["unet"]
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, run_dir.LDM_DIR), asynchronous=False)
  try:
    # Only what load_run reads, so that every bit flip below lands in it.
    ckpt.save(config.train_ldm.num_steps + 1, {"ema_params": later}, {})
  finally:
    ckpt.close()
  return workdir, config.train_ldm.num_steps, params, later


def _damaged_run(source, tmp_path, kind, step) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  DAMAGE[kind](os.path.join(workdir, run_dir.LDM_DIR, str(step)))
  return workdir


@pytest.mark.parametrize("kind", ["overwritten_chunk", "step_metadata_garbage", "bit_flip_5"])
def test_load_run_falls_back(run_with_two_ldm_steps, tmp_path, kind, caplog):
  source, final, params, _ = run_with_two_ldm_steps
  workdir = _damaged_run(source, tmp_path, kind, final + 1)
  with caplog.at_level(logging.WARNING):
    run = api.load_run(workdir)
  assert f"ldm: checkpoint step {final + 1} in " in caplog.text
  assert f"falling back to step {final}" in caplog.text
  _assert_equal(run.params["unet"], params["unet"])
  _assert_equal(run.params["autoencoder"], params["autoencoder"])


def test_load_run_names_a_damaged_step_asked_for(run_with_two_ldm_steps, tmp_path):
  source, final, params, later = run_with_two_ldm_steps
  _assert_equal(api.load_run(source).params["unet"], later)
  workdir = _damaged_run(source, tmp_path, "truncated_chunk", final + 1)
  with pytest.raises(DataError, match=f"ldm: checkpoint step {final + 1} in .* is damaged") as e:
    api.load_run(workdir, ldm_step=final + 1)
  assert "\n" not in str(e.value)
  _assert_equal(api.load_run(workdir, ldm_step=final).params["unet"], params["unet"])
  with pytest.raises(DataError, match=f"no checkpoint step 99 in .* steps {final}, {final + 1}"):
    api.load_run(workdir, ldm_step=99)


def test_load_run_reads_runs_saved_with_a_per_network_kernel_choice(run_with_two_ldm_steps,
                                                                      tmp_path):
  """Runs saved before the CPU kernels were chosen per process carry `*.conv_impl`: still load."""
  source, _, _, later = run_with_two_ldm_steps
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  path = os.path.join(workdir, run_dir.RUN_FILE)
  with open(path) as f:
    info = json.load(f)
  for section in ("autoencoder", "unet", "discriminator"):
    info["config"][section]["conv_impl"] = "auto"
  with open(path, "w") as f:
    json.dump(info, f)
  run = api.load_run(workdir)
  assert "conv_impl" not in run.config.unet and "conv_impl" not in run.config.autoencoder
  _assert_equal(run.params["unet"], later)
  api.make_sampler(run)  # builds the networks from the stored config


def test_load_run_reads_no_optimizer_state(tmp_path, monkeypatch):
  """Only the autoencoder's params and the UNet's EMA params are read from disk."""
  workdir = str(tmp_path / "run")
  config = presets.base_config("test")
  for stage in ("autoencoder", "ldm"):
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, stage), asynchronous=False)
    try:
      ckpt.save(4, _state(4), {})  # a whole train state: params, EMA, Adam moments
    finally:
      ckpt.close()
  files.write_json_atomic(
      os.path.join(workdir, run_dir.RUN_FILE),
      run_dir.run_info(config, STATS, 1.0, nifti.mni_affine(config.data.shape,
                                                             config.data.spacing)))
  read = []
  deserialize = ocp.type_handlers.ArrayHandler.deserialize

  async def recording(self, infos, args=None):
    read.extend(info.name for info in infos)
    return await deserialize(self, infos, args)

  monkeypatch.setattr(ocp.type_handlers.ArrayHandler, "deserialize", recording)
  run = api.load_run(workdir)
  _assert_equal(run.params["unet"], _state(4).ema_params)
  _assert_equal(run.params["autoencoder"], _state(4).params)
  assert sorted(read) == sorted(["params.conv.bias", "params.conv.kernel",
                                 "ema_params.conv.bias", "ema_params.conv.kernel"]), read


# The job itself, through the CLI: a rerun after damage to the newest step goes on.


def test_cli_rerun_after_damage_goes_on(tmp_path):
  # tests/test_train.py's autoencoder run (3 steps, a checkpoint each): the session compiles its
  # programs once for both files.
  config = presets.base_config("test")
  cohort = str(tmp_path / "cohort")
  synthetic.make_cohort(cohort, num_subjects=8, seed=0, spacing=config.data.spacing,
                        shape=tuple(config.data.shape))
  workdir = str(tmp_path / "run")
  command = _command(workdir, cohort, (AE_ONLY,))
  env = _env(devices=1)
  first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  _truncate(os.path.join(workdir, "autoencoder", "3"))
  rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "autoencoder: checkpoint step 3 in " in rerun.stderr
  assert "falling back to step 2" in rerun.stderr
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "autoencoder"))
  try:
    assert ckpt.latest_step() == 3
    assert int(ckpt.restore_state_only(step=3)["step"]) == 3
  finally:
    ckpt.close()


# Two processes, each holding half of a sharded array: digests are gathered from both, each
# checks its own shards, and both agree on the fallback.


def _two_process_worker(process_id: int, port: str, directory: str) -> None:
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))

  def state(step):
    value = np.random.default_rng(step).standard_normal((64, 8)).astype(np.float32)
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    return {"w": jax.make_array_from_callback(value.shape, spec, lambda index: value[index])}

  def assert_holds(restored, step):  # this process's shards
    want = state(step)["w"]
    for got, expected in zip(restored["w"].addressable_shards, want.addressable_shards, strict=True):
      np.testing.assert_array_equal(np.asarray(got.data), np.asarray(expected.data))

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state(0))
  ckpt = checkpoint_lib.Checkpointer(directory)
  for step in STEPS:
    ckpt.save(step, state(step), {})
  ckpt.close()
  multihost_utils.sync_global_devices("saved")
  if process_id == 0:  # a digest of a shard that only process 1 holds no longer matches
    path = os.path.join(directory, str(STEPS[-1]), checkpoint_lib.STEP_METADATA_FILE)
    with open(path) as f:
      metadata = json.load(f)
    shards = metadata["custom_metadata"][checkpoint_lib.DIGESTS_KEY]["w"]["shards"]
    shards[:] = [[index, "0" * 64 if index[0] == [48, 64] else digest] for index, digest in shards]
    with open(path, "w") as f:
      json.dump(metadata, f)
  multihost_utils.sync_global_devices("damaged")
  ckpt = checkpoint_lib.Checkpointer(directory)
  step, restored = ckpt.restore_newest_intact(abstract, set_aside=True)
  assert_holds(restored, step)
  ckpt.save(STEPS[-1], state(STEPS[-1]), {})  # saved again after the fallback
  ckpt.close()
  ckpt = checkpoint_lib.Checkpointer(directory)
  again, restored = ckpt.restore_newest_intact(abstract)
  assert_holds(restored, again)
  ckpt.close()
  print(f"process {process_id}: fell back to {step}, then restored {again}", flush=True)


def test_two_processes_agree_on_the_fallback(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(2))
  directory = str(tmp_path / "ldm")
  procs = [subprocess.Popen([sys.executable, __file__, str(i), port, directory], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert [out.strip().splitlines()[-1] for out, _ in outputs] == [
      f"process {i}: fell back to {STEPS[-2]}, then restored {STEPS[-1]}" for i in range(2)]
  assert "w[48:64, 0:8] differs from its digest" in outputs[1][1]
  assert "damaged on another process" in outputs[0][1]


if __name__ == "__main__":
  _two_process_worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
