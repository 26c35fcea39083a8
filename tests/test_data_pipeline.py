"""grain pipelines: determinism, exact resume (also through orbax), process shards, eval padding,
bad files inside workers, and batch sizes that do not divide."""

import os
import subprocess
import sys
import textwrap

import grain
import ml_collections
import nibabel as nib
import numpy as np
import pytest

from brain_ldm_jax.data import manifest, nifti, pipeline
from brain_ldm_jax.errors import ConfigError, DataError
from conftest import xla_flags

N = 8
SHAPE = (8, 8, 8)


def _data_config(**overrides):
  d = dict(shape=SHAPE, spacing=4.0, clip_percentiles=(0.5, 99.5), num_workers=0,
           skip_bad_subjects=False)
  d.update(overrides)
  return ml_collections.ConfigDict(d)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipe")
  subjects = []
  rng = np.random.default_rng(0)
  for i in range(N):
    path = str(root / f"s{i}.nii.gz")
    # Subject i's image has mean ~ i, so a loaded volume can be traced back to its file.
    nib.save(nib.Nifti1Image(rng.random((8, 8, 8)).astype(np.float32) + 4 * i,
                             nifti.mni_affine(SHAPE, 4.0)), path)
    subjects.append(manifest.Subject(f"sub-{i}", path, {"age": 50.0 + i, "sex": float(i % 2)}))
  stats = manifest.CovariateStats.from_subjects(subjects, ("age", "sex"))
  return subjects, stats, root


def _take(loader, n):
  return [next(loader) for _ in range(n)]


def _indices(batches):
  return [b["index"].tolist() for b in batches]


def test_batches_hold_preprocessed_volumes_and_scaled_covariates(cohort):
  subjects, stats, _ = cohort
  batch = next(pipeline.make_train_loader(subjects, stats, _data_config(), 4, seed=0))
  assert batch["image"].shape == (4, *SHAPE, 1) and batch["image"].dtype == np.float32
  assert batch["image"].min() >= 0 and batch["image"].max() <= 1
  assert batch["cond"].shape == (4, 2) and batch["cond"].dtype == np.float32
  for row, i in enumerate(batch["index"]):
    np.testing.assert_allclose(batch["cond"][row], stats.vector(subjects[i]))
  np.testing.assert_array_equal(batch["mask"], 1.0)


def test_shuffle_is_seeded_and_reshuffles_each_epoch(cohort):
  subjects, stats, _ = cohort
  a = _indices(_take(pipeline.make_train_loader(subjects, stats, _data_config(), 4, seed=1), 6))
  b = _indices(_take(pipeline.make_train_loader(subjects, stats, _data_config(), 4, seed=1), 6))
  c = _indices(_take(pipeline.make_train_loader(subjects, stats, _data_config(), 4, seed=2), 6))
  assert a == b and a != c
  epochs = [sum(a[2 * e:2 * e + 2], []) for e in range(3)]
  assert all(sorted(e) == list(range(N)) for e in epochs)  # every subject once per epoch
  assert epochs[0] != epochs[1] or epochs[1] != epochs[2]


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_from_state_sees_exactly_the_same_batches(cohort, workers):
  subjects, stats, _ = cohort
  config = _data_config(num_workers=workers)
  loader = pipeline.make_train_loader(subjects, stats, config, 2, seed=5)
  first = _take(loader, 3)
  state = loader.get_state()
  expected = _take(loader, 5)
  resumed = pipeline.make_train_loader(subjects, stats, config, 2, seed=5)
  resumed.set_state(state)
  got = _take(resumed, 5)
  assert _indices(got) == _indices(expected)
  for g, e in zip(got, expected):
    np.testing.assert_array_equal(g["image"], e["image"])
  if workers:  # worker processes change nothing about which batches come out
    in_process = pipeline.make_train_loader(subjects, stats, _data_config(), 2, seed=5)
    assert _indices(_take(in_process, 8)) == _indices(first + expected)


def test_orbax_composite_checkpoint_restores_the_iterator(cohort, tmp_path):
  import orbax.checkpoint as ocp
  subjects, stats, _ = cohort
  loader = pipeline.make_train_loader(subjects, stats, _data_config(), 2, seed=7)
  _take(loader, 2)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(2, args=ocp.args.Composite(data=pipeline.checkpoint_args(loader)))
    mngr.wait_until_finished()
  expected = _indices(_take(loader, 3))
  resumed = pipeline.make_train_loader(subjects, stats, _data_config(), 2, seed=7)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.restore(2, args=ocp.args.Composite(
        data=pipeline.checkpoint_args(resumed, restore=True)))
  assert _indices(_take(resumed, 3)) == expected


def test_process_shards_are_disjoint_and_cover_the_cohort(cohort):
  subjects, stats, _ = cohort
  seen = []
  for p in range(2):
    shard = grain.sharding.ShardOptions(shard_index=p, shard_count=2)
    loader = pipeline.make_train_loader(subjects, stats, _data_config(), 4, seed=3, shard=shard)
    batches = _take(loader, 2)  # 2 local batches of 2 = one epoch's half
    assert all(len(b["index"]) == 2 for b in batches)
    seen.append(sum(_indices(batches), []))
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(N))


def test_processes_hold_contiguous_blocks_of_the_same_global_batch(cohort):
  subjects, stats, _ = cohort
  whole = pipeline.make_train_loader(subjects, stats, _data_config(), 4, seed=3)
  expected = [list(map(int, b["index"])) for b in _take(whole, 2)]
  parts = []
  for p in range(2):
    shard = grain.sharding.ShardOptions(shard_index=p, shard_count=2)
    loader = pipeline.make_train_loader(subjects, stats, _data_config(), 4, seed=3, shard=shard)
    parts.append([list(map(int, b["index"])) for b in _take(loader, 2)])
  # Rows and their order (which pairs rows with per-row random draws) match one process's batch.
  assert [parts[0][k] + parts[1][k] for k in range(2)] == expected


def test_eval_loader_pads_the_last_batch_with_masked_records(cohort):
  subjects, stats, _ = cohort
  five = subjects[:5]
  per_process = []
  for p in range(2):
    shard = grain.sharding.ShardOptions(shard_index=p, shard_count=2)
    batches = list(pipeline.make_eval_loader(five, stats, _data_config(), 4, shard=shard))
    assert len(batches) == 2 and all(b["image"].shape == (2, *SHAPE, 1) for b in batches)
    per_process.append(batches)
  real = [i for batches in per_process for b in batches
          for i, m in zip(b["index"], b["mask"]) if m == 1]
  assert sorted(real) == list(range(5))
  masks = sum(float(b["mask"].sum()) for batches in per_process for b in batches)
  assert masks == 5
  padded = [b for batches in per_process for b in batches if b["mask"].min() == 0]
  assert all(np.all(b["image"][b["mask"] == 0] == 0) for b in padded)
  # Subject 4's image, loaded, has the largest mean (the files' intensities rise with i).
  b = per_process[0][1]
  assert b["index"][0] == 4 and b["mask"][0] == 1


@pytest.fixture()
def with_bad_file(cohort, tmp_path):
  subjects, stats, _ = cohort
  bad = tmp_path / "broken.nii.gz"
  bad.write_bytes(b"\x1f\x8b garbage")
  return subjects[:3] + [manifest.Subject("sub-bad", str(bad), subjects[3].covariates)], stats


def test_bad_file_in_a_worker_surfaces_as_data_error_naming_it(with_bad_file):
  subjects, stats = with_bad_file
  loader = pipeline.make_train_loader(subjects, stats, _data_config(num_workers=2), 4, seed=0)
  with pytest.raises(DataError, match=r"broken.nii.gz: not a readable NIfTI.*skip_bad_subjects"):
    _take(loader, 2)


def test_bad_file_skipped_and_counted_when_asked(with_bad_file):
  subjects, stats = with_bad_file
  config = _data_config(skip_bad_subjects=True)
  loader = pipeline.make_train_loader(subjects, stats, config, 3, seed=0)
  batches = _take(loader, 3)  # 9 records from 3 epochs of 3 good subjects
  assert 3 not in sum(_indices(batches), [])
  assert loader.num_skipped == 3
  evals = list(pipeline.make_eval_loader(subjects, stats, config, 4))
  assert len(evals) == 1 and evals[0]["mask"].tolist() == [1, 1, 1, 0]
  only_bad = pipeline.make_train_loader(subjects[3:], stats, config, 1, seed=0)
  with pytest.raises(DataError, match="all 1 subjects of this process failed to load"):
    next(only_bad)


def test_global_batch_must_divide_processes(cohort):
  subjects, stats, _ = cohort
  shard = grain.sharding.ShardOptions(shard_index=0, shard_count=2)
  with pytest.raises(ConfigError, match="train_ae.batch_size=3 does not divide across 2"):
    pipeline.make_train_loader(subjects, stats, _data_config(), 3, seed=0, shard=shard,
                               field="train_ae.batch_size")


def test_sharded_global_arrays_on_two_devices(cohort):
  """In a subprocess (XLA flags must precede the jax import): batches become jax.Arrays split
  over a 2-device mesh, and a global batch that does not divide the devices is refused."""
  subjects, stats, root = cohort
  script = textwrap.dedent(f"""
      import ml_collections, numpy as np, jax
      from brain_ldm_jax import sharding
      from brain_ldm_jax.data import manifest, pipeline
      from brain_ldm_jax.errors import ConfigError
      subjects = [manifest.Subject(f"sub-{{i}}", {str(root)!r} + f"/s{{i}}.nii.gz",
                                   {{"age": 50.0 + i, "sex": float(i % 2)}}) for i in range({N})]
      stats = manifest.CovariateStats.from_subjects(subjects, ("age", "sex"))
      config = ml_collections.ConfigDict(dict(shape={SHAPE}, spacing=4.0,
          clip_percentiles=(0.5, 99.5), num_workers=0, skip_bad_subjects=False))
      mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
      batch = next(pipeline.make_train_loader(subjects, stats, config, 4, 0, mesh))
      assert isinstance(batch["image"], jax.Array) and batch["image"].shape == (4, 8, 8, 8, 1)
      assert len(batch["image"].addressable_shards) == 2
      assert batch["image"].addressable_shards[1].data.shape == (2, 8, 8, 8, 1)
      try:
        pipeline.make_train_loader(subjects, stats, config, 3, 0, mesh)
      except ConfigError as e:
        assert "batch_size=3 does not divide across 2 devices" in str(e), e
      else:
        raise AssertionError("no ConfigError")
      print("OK")
  """)
  env = dict(os.environ, XLA_FLAGS=xla_flags(2),
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
