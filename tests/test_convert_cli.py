"""scripts/convert_monai.py: MONAI .pt files -> a run that load_run reads -> MONAI again."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import import_reference
from brain_ldm_jax import api
from brain_ldm_jax import presets
from brain_ldm_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANGES = "age=44:82,sex=0:1,ventricular_volume=5:90,brain_volume=900:1900"


def _monai_models(config):
  nets = import_reference("monai").networks.nets
  torch = import_reference("torch")
  torch.manual_seed(0)
  ae_cfg = {k: v for k, v in config.autoencoder.items() if k not in ("remat", "dtype")}
  unet_cfg = {k: v for k, v in config.unet.items() if k not in ("remat", "dtype")}
  return nets.AutoencoderKL(**ae_cfg), nets.DiffusionModelUNet(**unet_cfg)


def _run_script(*args):
  result = subprocess.run([sys.executable, "scripts/convert_monai.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]


def test_import_then_export_round_trips_through_monai(tmp_path):
  torch = import_reference("torch")
  config = presets.base_config("test")
  ae, unet = _monai_models(config)
  torch.save(ae.state_dict(), tmp_path / "ae.pt")
  torch.save(unet.state_dict(), tmp_path / "unet.pt")
  run_dir = str(tmp_path / "run")
  _run_script("--config=configs/ldm.py:test", f"--autoencoder={tmp_path / 'ae.pt'}",
              f"--unet={tmp_path / 'unet.pt'}", f"--covariate_ranges={RANGES}",
              "--scale_factor=0.7", f"--out={run_dir}")

  run = api.load_run(run_dir)
  assert run.scale_factor == 0.7
  assert run.stats.minimum[0] == 44 and run.stats.maximum[3] == 1900
  np.testing.assert_allclose(
      run.stats.normalise([[63.0, 1.0, 47.5, 1400.0]]), [[0.5, 1.0, 0.5, 0.5]], rtol=1e-6)

  export_dir = tmp_path / "export"
  _run_script(f"--out={run_dir}", f"--export={export_dir}")
  ae2, unet2 = _monai_models(config)
  ae2.load_state_dict(torch.load(export_dir / "autoencoder.pt", weights_only=True), strict=True)
  unet2.load_state_dict(torch.load(export_dir / "diffusion_model.pt", weights_only=True),
                        strict=True)
  for original, exported in ((ae, ae2), (unet, unet2)):
    for (name, a), (_, b) in zip(original.state_dict().items(), exported.state_dict().items()):
      np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def test_missing_covariate_range_is_a_clear_error(tmp_path):
  result = subprocess.run(
      [sys.executable, "scripts/convert_monai.py", "--config=configs/ldm.py:test",
       "--autoencoder=a.pt", "--unet=u.pt", "--covariate_ranges=age=44:82", f"--out={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "covariate_ranges lacks sex" in result.stderr


def _script_module():
  spec = importlib.util.spec_from_file_location("convert_monai",
                                                os.path.join(REPO, "scripts", "convert_monai.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_bundle_covariates_by_known_ranges_or_as_given():
  script = _script_module()
  as_given = script.bundle_stats(None)
  assert as_given.names == ("sex", "age", "ventricular_volume", "brain_volume")
  np.testing.assert_allclose(as_given.normalise([[1.0, 0.7, 0.2, 0.5]]), [[1.0, 0.7, 0.2, 0.5]])
  # Ranges in any order; the stats keep the bundle's order.
  natural = script.bundle_stats("age=40:80,brain_volume=1000:2000,sex=0:1,ventricular_volume=0:100")
  assert natural.names == as_given.names
  np.testing.assert_allclose(natural.normalise([[1.0, 70.0, 20.0, 1500.0]]),
                             [[1.0, 0.75, 0.2, 0.5]], rtol=1e-6)
  with pytest.raises(ConfigError, match="unknown covariates gender"):
    script.bundle_stats("gender=0:1,sex=0:1,age=40:80,brain_volume=1:2,ventricular_volume=0:1")
  config = script.bundle_config(presets.base_config("paper"))
  assert tuple(config.data.covariates) == as_given.names
  assert config.sampling.timestep_spacing == "monai" and config.sampling.num_steps == 50


def test_unet_sizes_must_follow_the_covariates(tmp_path):
  # The presets derive the sizes from the covariates; one set by hand must agree with them.
  result = subprocess.run(
      [sys.executable, "scripts/convert_monai.py", "--config=configs/ldm.py:test",
       "--config.data.covariates=('age','sex','brain_volume')", "--config.unet.in_channels=7",
       "--autoencoder=a.pt",
       "--unet=u.pt", "--covariate_ranges=age=44:82,sex=0:1,brain_volume=900:1900",
       f"--out={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "unet.in_channels=7" in result.stderr and "data.covariates (3)" in result.stderr
  assert not os.listdir(tmp_path)  # nothing written
