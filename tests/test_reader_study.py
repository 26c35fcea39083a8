"""Reader study: the page is blind, trials are balanced and matched, the scorer is right."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import struct
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from brain_ldm_jax import reader_study
from brain_ldm_jax.jobs import reader_study as reader_study_job
from brain_ldm_jax.errors import ConfigError, DataError
from brain_ldm_jax.reader_study import score as score_lib
from brain_ldm_jax.reader_study import trials as trials_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _head(seed: int, shape=(20, 24, 18), scale: float = 1.0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
  inside = (grid ** 2).sum(0) < 0.6
  return (scale * (inside * (0.6 + 0.1 * rng.random(shape)))).astype(np.float32)


def _write_set(folder, prefix: str, seeds, scale=1.0, shape=(20, 24, 18)):
  os.makedirs(folder, exist_ok=True)
  for seed in seeds:
    nib.save(nib.Nifti1Image(_head(seed, shape, scale), np.diag([2.0, 2.0, 2.0, 1.0])),
             os.path.join(folder, f"{prefix}_{seed}.nii.gz"))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  root = tmp_path_factory.mktemp("rs")
  # Names that would give the class away if they leaked into the page.
  _write_set(str(root / "REALSCANS" / "sub-01"), "realsubject", [1, 2, 3])
  _write_set(str(root / "MODELOUTQZ" / "bqzch"), "synthsample", [4, 5, 6, 7])
  result = reader_study.make_study(str(root / "REALSCANS"), str(root / "MODELOUTQZ"),
                                   str(root / "out"), num_trials=12, seed=0, display_size=48)
  with open(result["key"]) as f:
    key = json.load(f)
  with open(result["page"], encoding="utf-8") as f:
    text = f.read()
  start = text.index('id="study-data">') + len('id="study-data">')
  payload = json.loads(text[start:text.index("</script>", start)])
  return {"root": root, "key": key, "key_path": result["key"], "page": result["page"],
          "study_id": result["study_id"], "text": text, "payload": payload}


def _png_chunks(png: bytes) -> list[str]:
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  chunks, i = [], 8
  while i < len(png):
    length = struct.unpack(">I", png[i:i + 4])[0]
    chunks.append(png[i + 4:i + 8].decode("ascii"))
    i += 12 + length
  return chunks


def test_page_reveals_nothing_about_the_truth(study):
  text, payload, key = study["text"], study["payload"], study["key"]
  # No file or folder names, paths, or key contents (images cut out: base64 is random letters).
  text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
  for leak in ("REALSCANS", "MODELOUTQZ", "realsubject", "synthsample", "sub-01", "bqzch",
               ".nii", "truth", "answer_key", str(study["root"])):
    assert leak.lower() not in text.lower(), leak
  # Per-trial data: only a random id, the trial type and images; no labels or metadata.
  assert set(payload) == {"format", "study_id", "title", "confidence_levels", "storage_key",
                          "trials"}
  for trial in payload["trials"]:
    assert set(trial) == {"id", "type", "images"}
    assert re.fullmatch(r"t[0-9a-f]{12}", trial["id"])
  stripped = json.dumps([{k: v for k, v in t.items() if k != "images"}
                         for t in payload["trials"]]).lower()
  assert "real" not in stripped and "synth" not in stripped
  # The page lists exactly the key's trials, in the key's presentation order.
  assert [t["id"] for t in payload["trials"]] == [t["id"] for t in key["trials"]]
  # Images: metadata-free PNGs whose byte size depends only on the plane, never the class.
  size_by_plane_class: dict = {}
  for trial, k in zip(payload["trials"], key["trials"]):
    for uri, plane in zip(trial["images"], k["planes"]):
      png = base64.b64decode(uri.split(",", 1)[1])
      assert _png_chunks(png) == ["IHDR", "IDAT", "IEND"]
      size_by_plane_class.setdefault(plane, {}).setdefault(k["truth"], set()).add(len(png))
  for plane, sizes in size_by_plane_class.items():
    assert len(sizes["real"] | sizes["synthetic"]) == 1, plane
  # Self-contained: nothing to fetch, from the network or from disk.
  for external in ("http:", "https:", "file:", "url(", "@import", "<link", "<iframe"):
    assert external not in text, external
  assert not re.search(r"<[a-z]+\s[^>]*\b(src|href)\s*=", text)  # no tag loads a resource
  # No per-trial element ids or data attributes in the markup.
  assert not re.search(r'id="t[0-9a-f]{12}"', text)


def test_trials_are_balanced_and_matched(study):
  trials = study["key"]["trials"]
  assert len(trials) == 12
  cells = {}
  for t in trials:
    cells[(t["type"], t["truth"])] = cells.get((t["type"], t["truth"]), 0) + 1
  assert cells == {(ty, c): 3 for ty in ("slice", "triplet") for c in ("real", "synthetic")}
  views = {}
  for t in trials:
    views.setdefault((t["type"], tuple(t["planes"]), tuple(t["relative_position"])),
                     []).append(t["truth"])
  assert all(sorted(v) == ["real", "synthetic"] for v in views.values())
  slice_planes = {t["planes"][0] for t in trials if t["type"] == "slice"}
  assert slice_planes == {"axial", "coronal", "sagittal"}
  # Sources come from the right folders; both classes use as many distinct volumes (3 real,
  # 3 of the 4 synthetic), each used equally often, so repeats say nothing about the class.
  uses = {}
  for t in trials:
    assert ("MODELOUTQZ" in t["source"]) == (t["truth"] == "synthetic")
    uses.setdefault(t["truth"], {}).setdefault(t["source"], 0)
    uses[t["truth"]][t["source"]] += 1
  assert sorted(uses["real"].values()) == sorted(uses["synthetic"].values()) == [2, 2, 2]
  # The order is shuffled, not real/synthetic alternating in pairs.
  truths = [t["truth"] for t in trials]
  assert truths != ["real", "synthetic"] * 6 and truths != ["synthetic", "real"] * 6


def test_same_seed_same_views_different_ids(study, tmp_path):
  root = study["root"]
  again = reader_study.make_study(str(root / "REALSCANS"), str(root / "MODELOUTQZ"),
                                  str(tmp_path), num_trials=12, seed=0, display_size=48)
  with open(again["key"]) as f:
    key = json.load(f)
  strip = lambda ts: [(t["truth"], t["relative_position"], t["source"]) for t in ts]
  assert strip(key["trials"]) == strip(study["key"]["trials"])
  assert not {t["id"] for t in key["trials"]} & {t["id"] for t in study["key"]["trials"]}
  assert key["study_id"] != study["study_id"]


def test_pooled_window_is_shared(tmp_path):
  # Synthetic volumes twice as bright: with one pooled window they must render brighter.
  _write_set(str(tmp_path / "a"), "x", [1, 2])
  _write_set(str(tmp_path / "b"), "y", [1, 2], scale=2.0)
  result = reader_study.make_study(str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "o"),
                                   num_trials=4, trial_types=("slice", "triplet"),
                                   display_size=32)
  with open(result["key"]) as f:
    key = json.load(f)
  lo, hi = key["rendering"]["pooled_window"]
  assert 0.0 <= lo < hi and hi > 0.6  # the window spans both classes' intensities


def test_errors_name_the_field(tmp_path):
  _write_set(str(tmp_path / "r"), "x", [1])
  _write_set(str(tmp_path / "s"), "y", [2])
  os.makedirs(tmp_path / "empty")
  with pytest.raises(DataError, match="synthetic_dir"):
    reader_study.make_study(str(tmp_path / "r"), str(tmp_path / "empty"), str(tmp_path / "o"))
  with pytest.raises(ConfigError, match="synthetic_dir is empty"):
    reader_study.make_study(str(tmp_path / "r"), "", str(tmp_path / "o"))
  with pytest.raises(ConfigError, match="num_trials"):
    reader_study.make_study(str(tmp_path / "r"), str(tmp_path / "s"), str(tmp_path / "o"),
                            num_trials=6)
  with pytest.raises(ConfigError, match="share files"):
    reader_study.make_study(str(tmp_path / "r"), str(tmp_path / "r"), str(tmp_path / "o"))
  with pytest.raises(ConfigError, match="trial_types"):
    trials_lib.check_trial_types(("slice", "volume"))
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "broken.nii").write_bytes(b"not a nifti")
  with pytest.raises(DataError, match="broken.nii"):
    reader_study.make_study(str(tmp_path / "r"), str(tmp_path / "bad"), str(tmp_path / "o"),
                            num_trials=4)


def _load_config(preset="test"):
  spec = importlib.util.spec_from_file_location("rs_config",
                                                os.path.join(REPO, "configs", "reader_study.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def test_job_from_config(tmp_path):
  _write_set(str(tmp_path / "cohort" / "sub-1" / "anat"), "t1", [1, 2])
  _write_set(str(tmp_path / "samples"), "s", [3, 4])
  config = _load_config()
  assert config.job == "reader_study"
  with pytest.raises(ConfigError, match="synthetic_dir"):
    reader_study_job.run_reader_study_job(config, str(tmp_path))
  config.reader_study.synthetic_dir = str(tmp_path / "samples")
  config.data.assume_mni = True  # the job puts volumes on the run's MNI grid; these are not MNI
  config.reader_study.num_trials = 4
  config.reader_study.display_size = 32
  # real_dir defaults to <workdir>/cohort (the project's cohort job writes it there).
  result = reader_study_job.run_reader_study_job(config, str(tmp_path))
  assert result["page"] == str(tmp_path / "reader_study" / "reader_study.html")
  assert os.path.isfile(result["key"])


@pytest.mark.slow
def test_cli_runs_job_and_scorer(tmp_path):
  _write_set(str(tmp_path / "real"), "r", [1, 2])
  _write_set(str(tmp_path / "synth"), "s", [3, 4])
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = subprocess.run(
      [sys.executable, "-m", "brain_ldm_jax.main",
       f"--config={os.path.join(REPO, 'configs', 'reader_study.py')}:test",
       f"--workdir={tmp_path / 'w'}", f"--config.reader_study.real_dir={tmp_path / 'real'}",
       f"--config.reader_study.synthetic_dir={tmp_path / 'synth'}", "--config.data.assume_mni=True",
       "--config.reader_study.num_trials=4", "--config.reader_study.display_size=32"],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
  assert run.returncode == 0, run.stderr[-2000:]
  key_path = tmp_path / "w" / "reader_study" / "answer_key.json"
  with open(key_path) as f:
    key = json.load(f)
  answers = {"study_id": key["study_id"], "reader": "cli",
             "answers": [{"trial_id": t["id"], "answer": t["truth"], "confidence": 2}
                         for t in key["trials"]]}
  (tmp_path / "a.json").write_text(json.dumps(answers))
  run = subprocess.run(
      [sys.executable, "-m", "brain_ldm_jax.reader_study.score", "--key", str(key_path),
       str(tmp_path / "a.json")], capture_output=True, text=True, cwd=REPO, timeout=60)
  assert run.returncode == 0, run.stderr
  assert "POOLED" in run.stdout
  with open(tmp_path / "w" / "reader_study" / "scores.json") as f:
    assert json.load(f)["pooled"]["overall"]["accuracy"] == 1.0


# ----------------------------------------------------------------------------- scorer


def _key(truths, types=None):
  types = types or ["slice"] * len(truths)
  return {"study_id": "sX", "trials": [{"id": f"t{i}", "truth": t, "type": ty}
                                       for i, (t, ty) in enumerate(zip(truths, types))]}


def _answers(answers, confidences=None, reader="r", study_id="sX"):
  confidences = confidences or [3] * len(answers)
  return {"study_id": study_id, "reader": reader,
          "answers": [{"trial_id": f"t{i}", "answer": a, "confidence": c}
                      for i, (a, c) in enumerate(zip(answers, confidences))]}


def test_score_known_answers():
  truths = ["synthetic"] * 10 + ["real"] * 10
  # 8 of 10 synthetic called synthetic (sensitivity .8), 6 of 10 real called real (spec .6).
  answers = (["synthetic"] * 8 + ["real"] * 2) + (["real"] * 6 + ["synthetic"] * 4)
  m = score_lib.score(_key(truths), [_answers(answers)])["readers"][0]["overall"]
  assert m["n"] == 20 and m["n_correct"] == 14 and m["accuracy"] == pytest.approx(0.7)
  assert m["sensitivity"] == pytest.approx(0.8) and m["specificity"] == pytest.approx(0.6)
  lo, hi = m["accuracy_ci95"]
  assert lo < 0.7 < hi
  # Clopper-Pearson for 14/20 (reference values from the beta quantiles).
  assert lo == pytest.approx(0.4572, abs=1e-3) and hi == pytest.approx(0.8811, abs=1e-3)
  assert m["p_value"] == pytest.approx(0.1153, abs=1e-3) and not m["distinguishable"]
  # d' with the log-linear correction: z(8.5/11) - z(4.5/11).
  from scipy import stats
  assert m["d_prime"] == pytest.approx(stats.norm.ppf(8.5 / 11) - stats.norm.ppf(4.5 / 11))
  assert m["d_prime"] > 0


def test_score_perfect_inverse_and_chance():
  truths = ["synthetic", "real"] * 10
  perfect = score_lib.score(_key(truths), [_answers(truths)])["readers"][0]["overall"]
  assert perfect["accuracy"] == 1.0 and perfect["distinguishable"]
  assert np.isfinite(perfect["d_prime"]) and perfect["d_prime"] > 2  # finite despite rates 1, 0
  assert perfect["auc"] == 1.0 and perfect["accuracy_ci95"][1] == 1.0
  flipped = [{"real": "synthetic", "synthetic": "real"}[t] for t in truths]
  inverse = score_lib.score(_key(truths), [_answers(flipped)])["readers"][0]["overall"]
  assert inverse["accuracy"] == 0.0 and inverse["distinguishable"]
  assert inverse["d_prime"] == pytest.approx(-perfect["d_prime"])
  assert inverse["auc"] == 0.0 and inverse["accuracy_ci95"][0] == 0.0
  always_real = score_lib.score(_key(truths), [_answers(["real"] * 20)])["readers"][0]["overall"]
  assert always_real["accuracy"] == 0.5 and not always_real["distinguishable"]
  assert always_real["d_prime"] == pytest.approx(0.0)
  assert always_real["p_value"] == pytest.approx(1.0)


def test_score_confidence_auc_and_pooling_and_types():
  truths = ["synthetic", "synthetic", "real", "real"]
  types = ["slice", "triplet", "slice", "triplet"]
  # All answers 'synthetic', but more confident on the synthetic ones: AUC 1, accuracy .5.
  a = _answers(["synthetic"] * 4, [5, 4, 1, 2], reader="a")
  b = _answers(["synthetic", "real", None, "real"], [5, 1, None, 3], reader="a")
  result = score_lib.score(_key(truths, types), [a, b])
  ra, rb = result["readers"]
  assert ra["overall"]["auc"] == 1.0 and ra["overall"]["accuracy"] == 0.5
  assert rb["reader"] == "a#2" and rb["n_missing"] == 1 and rb["overall"]["n"] == 3
  assert set(ra["by_type"]) == {"slice", "triplet"} and ra["by_type"]["slice"]["n"] == 2
  assert result["pooled"]["overall"]["n"] == 7
  assert result["pooled"]["overall"]["n_correct"] == ra["overall"]["n_correct"] + \
      rb["overall"]["n_correct"]
  table = score_lib.format_table(result)
  assert "POOLED" in table and "a#2" in table and "unanswered" in table


def test_score_rejects_foreign_answers():
  key = _key(["real", "synthetic"])
  with pytest.raises(DataError, match="study_id"):
    score_lib.score(key, [_answers(["real", "real"], study_id="other")])
  bad = _answers(["real", "real"])
  bad["answers"][0]["trial_id"] = "tZZ"
  with pytest.raises(DataError, match="tZZ"):
    score_lib.score(key, [bad])
  with pytest.raises(DataError, match="maybe"):
    score_lib.score(key, [_answers(["real", "maybe"])])


def test_job_puts_both_classes_on_the_run_grid(tmp_path):
  # A real scan with its own field of view and voxel size (the MNI152 template, 1 mm) against
  # samples on the run's 4 mm grid: taken as they are, the fields of view differ (warning); the
  # job puts both on the run's grid, so they do not.
  import nilearn  # pylint: disable=import-outside-toplevel
  from brain_ldm_jax.data import nifti  # pylint: disable=import-outside-toplevel
  template = os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data",
                          "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
  config = _load_config("test")
  os.makedirs(tmp_path / "real")
  os.symlink(template, tmp_path / "real" / "mni.nii.gz")
  grid = trials_lib.Grid.from_config(config.data)
  volume, affine = nifti.load_volume(template, grid.shape, grid.spacing)
  for i in range(2):
    nifti.save_volume(str(tmp_path / "synth" / f"s{i}.nii.gz"), np.roll(volume, i, 0), affine)
  options = dict(num_trials=4, display_size=32)

  def fov_warnings(make):
    warnings = []
    with pytest.MonkeyPatch.context() as m:
      m.setattr(trials_lib.logging, "warning", lambda *a: warnings.append(a[0]))
      make()
    return [w for w in warnings if "fields of view" in w]

  assert fov_warnings(lambda: reader_study.make_study(
      str(tmp_path / "real"), str(tmp_path / "synth"), str(tmp_path / "as_is"), **options))
  config.reader_study.real_dir = str(tmp_path / "real")
  config.reader_study.synthetic_dir = str(tmp_path / "synth")
  config.reader_study.update(options)
  assert not fov_warnings(lambda: reader_study_job.run_reader_study_job(config, str(tmp_path)))
