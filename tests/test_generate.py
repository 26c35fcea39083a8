"""The `generate` job: covariates, determinism, resume after kill -9, BIDS output, errors.

The end-to-end tests run the real CLI in subprocesses on a tiny random-weight run (`test` preset,
2 DDIM steps), sharing one persistent compilation cache so that restarts do not recompile.
"""

from __future__ import annotations

import errno
import filecmp
import gzip
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from brain_ldm_jax import api
from brain_ldm_jax import bids
from brain_ldm_jax import covariates
from brain_ldm_jax import files
from brain_ldm_jax import generate
from brain_ldm_jax import presets
from brain_ldm_jax import run_dir as run_dir_lib
from brain_ldm_jax import sampling
from brain_ldm_jax.data import manifest
from brain_ldm_jax.data import nifti
from brain_ldm_jax.errors import ConfigError, DataError
from brain_ldm_jax.jobs import generate as generate_job
from random_weights import random_params
from conftest import xla_flags
from test_train import _free_port, _wait_all

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600
NUM_SUBJECTS = 8
NAMES = presets.COVARIATES
STATS = manifest.CovariateStats(NAMES, (45.0, 0.0, 10.0, 1000.0), (80.0, 1.0, 120.0, 1500.0))


def make_tiny_run(workdir: str, num_steps: int = 2) -> None:
  config = presets.base_config("test")
  config.sampling.num_steps = num_steps
  api.save_run(workdir, config, random_params(config), STATS, 1.0,
               nifti.mni_affine(config.data.shape, config.data.spacing))


def write_tsv(path: str, header, rows) -> str:
  with open(path, "w", encoding="utf-8") as f:
    f.write("\t".join(header) + "\n")
    for row in rows:
      f.write("\t".join(map(str, row)) + "\n")
  return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  make_tiny_run(workdir)
  return workdir


@pytest.fixture(scope="module")
def wanted_tsv(tmp_path_factory):
  """Requested covariates for NUM_SUBJECTS subjects (sex as M/F, one extra column)."""
  rng = np.random.default_rng(1)
  rows = [(f"sub-w{i}", round(rng.uniform(45, 80), 2), "MF"[i % 2], round(rng.uniform(10, 120), 1),
           round(rng.uniform(1000, 1500), 1), "x") for i in range(NUM_SUBJECTS)]
  return write_tsv(str(tmp_path_factory.mktemp("tsv") / "wanted.tsv"),
                   ("participant_id", *NAMES, "site"), rows)


def _env(devices: int, cache: str) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(devices)
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = cache
  return env


def _command(out_dir, run_dir, tsv, batch_size, extra=()):
  return [sys.executable, "-m", "brain_ldm_jax.main", "--config=configs/generate.py:test",
          f"--workdir={out_dir}", f"--config.generate.run_dir={run_dir}",
          f"--config.generate.covariates_tsv={tsv}",
          f"--config.generate.batch_size={batch_size}", "--config.generate.progress_every_s=0",
          *extra]


def _generate(out_dir, run_dir, tsv, cache, batch_size, devices=1, extra=()):
  result = subprocess.run(_command(out_dir, run_dir, tsv, batch_size, extra), cwd=REPO,
                          env=_env(devices, cache), capture_output=True, text=True,
                          timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def _all_files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, files in os.walk(root) for f in files)


def _voxels(root, index):
  return np.asarray(nib.load(bids.image_path(root, bids.subject_label(index))).dataobj)


def _assert_no_partial_files(root):
  """Every file under a final name is whole; a sidecar never exists without its image."""
  for rel in _all_files(root):
    path = os.path.join(root, rel)
    name = os.path.basename(rel)
    if name.startswith(files.TMP_PREFIX):
      continue  # a temporary: allowed mid-run, never under a final name
    if name.endswith(".nii.gz"):
      with gzip.open(path) as f:  # reads to the end: checks the length and CRC
        data = f.read()
      assert len(data) > 352, rel
      nib.load(path).get_fdata()
    elif name.endswith(".json"):
      with open(path) as f:
        json.load(f)
      if name.endswith("_T1w.json"):
        assert os.path.exists(path[:-len(".json")] + ".nii.gz"), rel
    elif name.endswith(".tsv") or name == "README":
      with open(path) as f:
        assert f.read().endswith("\n"), rel


@pytest.fixture(scope="module")
def datasets(tiny_run, wanted_tsv, tmp_path_factory):
  """The reference dataset: one uninterrupted run on 1 device, batch 4."""
  root = tmp_path_factory.mktemp("generated")
  cache = str(root / "xla_cache")
  reference = str(root / "reference")
  _generate(reference, tiny_run, wanted_tsv, cache, batch_size=4)
  return dict(root=root, cache=cache, reference=reference)


# ----------------------------------------------------------------------------------------------
# End to end


def _final_files(root) -> set[str]:
  """The files under their final names (temporaries left out)."""
  if not os.path.isdir(root):
    return set()
  return {f for f in _all_files(root) if not os.path.basename(f).startswith(files.TMP_PREFIX)}


@pytest.mark.slow
def test_kill_and_resume_is_byte_identical(tiny_run, wanted_tsv, datasets):
  out = str(datasets["root"] / "killed")
  rng = random.Random(0)
  # One writer thread and a short queue: each attempt makes little progress before its kill.
  # Batch 1 here, batch 4 in the reference: the comparison also covers the batch size.
  command = _command(out, tiny_run, wanted_tsv, batch_size=1,
                     extra=("--config.generate.writer_threads=1",
                            "--config.generate.max_pending_subjects=1"))
  env = _env(1, datasets["cache"])
  # Each attempt is killed once the dataset holds a drawn number of files: right after the plan,
  # among the first subjects, the middle ones, and the last subjects or the tables, so the kills
  # reach late into the writing with one process start each. Four attempts: a fast machine that
  # finishes the last before its kill still leaves three.
  total = len(_all_files(datasets["reference"]))
  quarter = (total - 1) // 4
  targets = [1, rng.randint(2, 1 + quarter), rng.randint(2 + quarter, 1 + 2 * quarter),
             rng.randint(total - quarter, total - 1)]
  kills = 0
  for target in targets:
    before = _final_files(out)
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # Kill at a random moment within 50 ms of the file that reaches the target (an image, a
    # sidecar, a table or the plan), i.e. in the middle of writing or sampling.
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:
      now = _final_files(out)
      if now - before and len(now) >= target:
        time.sleep(rng.uniform(0.0, 0.05))
        break
      time.sleep(0.02)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      kills += 1
      _assert_no_partial_files(out)
    else:
      assert proc.returncode == 0, f"the job failed with exit code {proc.returncode}"
      break
  assert kills >= 3, f"the run finished before 3 kills ({kills}; targets {targets} of {total})"
  _generate(out, tiny_run, wanted_tsv, datasets["cache"], batch_size=1)  # resume
  reference = datasets["reference"]
  assert _all_files(out) == _all_files(reference)
  _, mismatch, errors = filecmp.cmpfiles(reference, out, _all_files(reference), shallow=False)
  assert not mismatch and not errors, (mismatch, errors)
  assert bids.check_bids_dataset(out) == []


@pytest.mark.slow
def test_two_devices_give_identical_images(tiny_run, wanted_tsv, datasets):
  # 2 forced CPU devices with 2 subjects each vs the reference's 1 device with 4; only the first
  # 4 subjects of the table. (Batch 1 vs 4 is covered by the kill test, which runs batch 1.)
  out = str(datasets["root"] / "two_devices")
  _generate(out, tiny_run, wanted_tsv, datasets["cache"], batch_size=4, devices=2,
            extra=("--config.generate.num_subjects=4",))
  reference = datasets["reference"]
  for i in range(4):
    np.testing.assert_array_equal(_voxels(out, i), _voxels(reference, i))
    assert filecmp.cmp(bids.image_path(out, bids.subject_label(i)),
                       bids.image_path(reference, bids.subject_label(i)), shallow=False)
  assert bids.check_bids_dataset(out) == []


@pytest.mark.slow
def test_two_processes_give_identical_images(tiny_run, wanted_tsv, datasets):
  # Two processes of one device each (process p samples subjects p, p + 2, ...; batch 1 each) vs
  # the reference's one process with batch 4; the first 4 subjects of the table.
  out = str(datasets["root"] / "two_processes")
  port = _free_port()
  runs = []
  for i in range(2):
    command = _command(out, tiny_run, wanted_tsv, batch_size=2,
                       extra=("--config.generate.num_subjects=4",
                              f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                              f"--process_id={i}"))
    log = open(f"{out}.{i}.stderr", "w+")
    runs.append((subprocess.Popen(["timeout", "-s", "KILL", str(TIMEOUT), *command], cwd=REPO,
                                  env=_env(1, datasets["cache"]), stdout=subprocess.DEVNULL,
                                  stderr=log), log))
  _wait_all(runs)
  reference = datasets["reference"]
  for i in range(4):
    assert filecmp.cmp(bids.image_path(out, bids.subject_label(i)),
                       bids.image_path(reference, bids.subject_label(i)), shallow=False)
  assert bids.check_bids_dataset(out) == []


def test_check_bids_dataset_reports_problems(datasets, tmp_path):
  broken = str(tmp_path / "broken")
  shutil.copytree(datasets["reference"], broken)
  assert bids.check_bids_dataset(broken) == []
  os.remove(bids.sidecar_path(broken, "sub-000001"))
  open(os.path.join(broken, "sub-000002", "anat", ".tmp-123-sub-000002_T1w.json"), "w").close()
  tsv = os.path.join(broken, "participants.tsv")
  with open(tsv) as f:
    lines = f.read().splitlines()
  cells = lines[4].split("\t")
  cells[1] = "99.5"  # sub-000003's age no longer matches its sidecar
  lines[4] = "\t".join(cells)
  lines.append("sub-999999" + "\t1" * (len(cells) - 1))
  with open(tsv, "w") as f:
    f.write("\n".join(lines) + "\n")
  os.remove(os.path.join(broken, "dataset_description.json"))
  problems = "\n".join(bids.check_bids_dataset(broken))
  assert "sub-000001_T1w.json: missing" in problems
  assert "temporary" in problems
  assert "sub-000003: age is 99.5" in problems
  assert "sub-999999: in participants.tsv but has no folder" in problems
  assert "dataset_description.json: missing" in problems


def test_reference_dataset_contents(datasets, wanted_tsv):
  root = datasets["reference"]
  with open(os.path.join(root, "participants.tsv")) as f:
    rows = [line.rstrip("\n").split("\t") for line in f]
  assert rows[0] == ["participant_id", *NAMES, bids.SOURCE_ID_COLUMN]
  assert [r[0] for r in rows[1:]] == [f"sub-{i:06d}" for i in range(NUM_SUBJECTS)]
  assert [r[-1] for r in rows[1:]] == [f"sub-w{i}" for i in range(NUM_SUBJECTS)]
  assert [float(r[2]) for r in rows[1:]] == [1.0, 0.0] * (NUM_SUBJECTS // 2)  # M/F -> 1/0
  with open(bids.sidecar_path(root, "sub-000005")) as f:
    side = json.load(f)
  assert side["SubjectIndex"] == 5 and side["Sampler"] == "ddim" and side["NumSteps"] == 2
  assert side["SourceParticipantId"] == "sub-w5"
  with open(os.path.join(root, "dataset_description.json")) as f:
    description = json.load(f)
  assert description["DatasetType"] == "derivative"
  assert description["GeneratedBy"][0]["Name"] == "brain_ldm_jax"
  img = nib.load(bids.image_path(root, "sub-000000"))
  config = presets.base_config("test")
  np.testing.assert_allclose(img.affine, nifti.mni_affine(config.data.shape, config.data.spacing))
  assert int(img.header["sform_code"]) == nifti.XFORM_MNI
  volume = np.asarray(img.dataobj)
  assert volume.dtype == np.float32 and 0.0 <= volume.min() and volume.max() <= 1.0
  assert volume.std() > 0  # not a constant image
  assert not np.array_equal(volume, _voxels(root, 1))  # subjects differ


# ----------------------------------------------------------------------------------------------
# Errors and pieces


def _config(run_dir="", **fields):
  """configs/generate.py:test, as the CLI loads it, with `generate` fields set."""
  spec = importlib.util.spec_from_file_location("generate_config",
                                                os.path.join(REPO, "configs", "generate.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("test")
  config.generate.run_dir = run_dir
  for k, v in fields.items():
    config.generate[k] = v
  return config


@pytest.fixture(scope="module")
def loaded_run(tiny_run):
  return generate.load_checked_run(tiny_run)


def test_job_errors(tiny_run, loaded_run, tmp_path):
  out = str(tmp_path / "out")
  with pytest.raises(ConfigError, match="generate.run_dir is empty"):
    generate_job.run_generate_job(_config(""), out)
  with pytest.raises(DataError, match="does not exist"):
    generate_job.run_generate_job(_config(str(tmp_path / "nope")), out)
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="run.json"):
    generate_job.run_generate_job(_config(str(tmp_path / "empty")), out)
  for fields, message in ((dict(), "num_subjects is 0"),
                          (dict(num_subjects=2, sampler="euler"), "sampler='euler'"),
                          (dict(num_subjects=2, sampler="ddpm", eta=0.5), "only applies to the ddim"),
                          (dict(num_subjects=2, output_dtype="float64"), "output_dtype"),
                          (dict(num_subjects=2, stratify=True, covariates_tsv="x.tsv"),
                           "cannot be combined")):
    with pytest.raises(ConfigError, match=message):
      generate.make_plan(loaded_run, generate.settings_from_config(_config(tiny_run, **fields),
                                                                   out))


def test_drawn_plan_without_cohort_is_uniform(loaded_run, tmp_path):
  settings = generate.settings_from_config(
      _config(loaded_run.checkpoint, num_subjects=16, stratify=True, age_bins=2), str(tmp_path))
  plan = generate.make_plan(loaded_run, settings)
  assert plan.num_subjects == 16 and plan.source_ids is None
  assert "uniformly" in plan.source and "stratified" in plan.source
  assert [r[1] for r in plan.covariates[:4]] == [0.0, 1.0, 0.0, 1.0]
  assert generate.make_plan(loaded_run, settings).covariates.tolist() == plan.covariates.tolist()


def test_incompatible_checkpoint(tiny_run, tmp_path):
  other = str(tmp_path / "other")
  shutil.copytree(tiny_run, other)
  path = os.path.join(other, run_dir_lib.RUN_FILE)
  with open(path) as f:
    info = json.load(f)
  info["config"]["unet"]["channels"] = [16, 16, 16]
  with open(path, "w") as f:
    json.dump(info, f)
  with pytest.raises(DataError, match="does not fit the networks"):
    generate.load_checked_run(other)


def test_covariates_tsv_errors(tmp_path):
  good = [("a", 60, "F", 30, 1200), ("b", 70, "M", 40, 1100)]
  header = ("participant_id", *NAMES)
  matrix, ids = covariates.read_covariates_tsv(write_tsv(str(tmp_path / "ok.tsv"), header, good),
                                             NAMES)
  assert ids == ["a", "b"]
  np.testing.assert_array_equal(matrix, [[60, 0, 30, 1200], [70, 1, 40, 1100]])
  # participant_id is optional, column order free
  matrix, ids = covariates.read_covariates_tsv(
      write_tsv(str(tmp_path / "noid.tsv"), NAMES[::-1], [r[1:][::-1] for r in good]), NAMES)
  assert ids is None and matrix.shape == (2, 4)
  cases = {
      "missing": (("participant_id", "age", "sex", "brain_volume"),
                  [("a", 60, 0, 1200)], r"missing column\(s\) 'ventricular_volume'"),
      "text": (header, [good[0], ("b", "old", "M", 40, 1100)], r"row 3 \(b\), column 'age'"),
      "nan": (header, [("a", 60, "F", "NaN", 1200)], r"row 2 \(a\), column 'ventricular_volume'"),
      "empty": (header, [("a", 60, "F", "", 1200)], "column 'ventricular_volume': empty"),
      "ragged": (header, [("a", 60, "F", 30)], "row 2 has 4 cells"),
      "duplicate": (header, [good[0], good[0]], "a appears more than once"),
  }
  for name, (cols, rows, message) in cases.items():
    path = write_tsv(str(tmp_path / f"{name}.tsv"), cols, rows)
    with pytest.raises(DataError, match=message) as info:
      covariates.read_covariates_tsv(path, NAMES)
    assert path in str(info.value)


def test_draw_covariates():
  cohort = np.array([[50, 0, 20, 1300], [52, 1, 25, 1350], [75, 0, 60, 1100], [78, 1, 70, 1150]],
                    np.float64)
  drawn = covariates.draw_covariates(40, 0, STATS, cohort)
  assert {tuple(r) for r in drawn} <= {tuple(r) for r in cohort}  # joint rows kept together
  np.testing.assert_array_equal(drawn, covariates.draw_covariates(40, 0, STATS, cohort))
  strat = covariates.draw_covariates(16, 0, STATS, cohort, stratify=True, age_bins=2)
  # subject i in stratum i mod 4 = (age bin, sex): young F, young M, old F, old M
  edges = covariates.age_bin_edges(STATS, 2)
  for i, row in enumerate(strat):
    age_bin, sex = divmod(i % 4, 2)
    assert row[1] == sex and edges[age_bin] <= row[0] <= edges[age_bin + 1]
  uniform = covariates.draw_covariates(200, 0, STATS, None, stratify=True, age_bins=4)
  assert set(uniform[:, 1]) == {0.0, 1.0}
  lo, hi = np.asarray(STATS.minimum), np.asarray(STATS.maximum)
  assert np.all((uniform >= lo) & (uniform <= hi))


def test_full_disk_is_a_clear_error(monkeypatch, tmp_path):
  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(nifti, "save_volume", full)
  with pytest.raises(DataError, match="no space left.*sub-000007/anat.*rerun"):
    bids.write_subject(str(tmp_path), "sub-000007", np.zeros((2, 2, 2), np.float32),
                       np.eye(4), "{}\n", "float32")


def test_plan_guards_the_folder(tmp_path):
  def plan(seed):
    return bids.Plan(names=NAMES, covariates=np.ones((2, 4)), source_ids=None, source="x",
                     model={"RunDirectory": "/r"}, sampling={"sampler": "ddim"}, seed=seed,
                     output_dtype="float32")

  out = str(tmp_path)
  generate.check_or_write_plan(plan(0), out, overwrite=False)
  generate.check_or_write_plan(plan(0), out, overwrite=False)  # same plan: resume
  with pytest.raises(ConfigError, match="other settings"):
    generate.check_or_write_plan(plan(1), out, overwrite=False)
  generate.check_or_write_plan(plan(1), out, overwrite=True)


def test_temporaries_and_atomic_text(tmp_path):
  path = str(tmp_path / "a.json")
  files.write_text_atomic(path, "x\n")
  open(str(tmp_path / ".tmp-99-a.json"), "w").close()
  assert files.remove_temporaries(str(tmp_path)) == 1
  assert os.listdir(tmp_path) == ["a.json"]


def test_batches_and_shares():
  assert [(ids.tolist(), n) for ids, n in sampling.batches([3, 5, 7], 2)] == \
      [([3, 5], 2), ([7, 7], 1)]
  shares = [generate.process_share(7, p, 3) for p in range(3)]
  assert sorted(sum(shares, [])) == list(range(7))
