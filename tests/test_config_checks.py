"""Config mistakes end in one line naming the field and what is allowed, before any heavy work."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys

import pytest

from brain_ldm_jax import config_checks
from brain_ldm_jax import presets
from brain_ldm_jax.diffusion import losses
from brain_ldm_jax.diffusion import schedules
from brain_ldm_jax.errors import ConfigError
from brain_ldm_jax.nn import layers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_preset_passes():
  for preset in presets.PRESETS:
    config_checks.check_config(presets.base_config(preset))


def test_demo_long_is_the_demo_trained_longer():
  demo, long = presets.base_config("demo").to_dict(), presets.base_config("demo_long").to_dict()
  differ = {f"{section}.{name}" for section, fields in demo.items() if isinstance(fields, dict)
            for name in fields if fields[name] != long[section][name]}
  # The schedule, plus the autoencoder loss and rate that demo_long was measured with.
  assert differ == {"train_ae.num_steps", "train_ae.checkpoint_every", "train_ae.image_every",
                    "train_ae.adv_weight", "train_ae.lr_schedule", "train_ae.clip_reconstruction",
                    "train_ldm.num_steps",
                    "train_ldm.ema_decay", "train_ldm.checkpoint_every", "train_ldm.image_every"}
  assert long["train_ae"]["num_steps"] > demo["train_ae"]["num_steps"]
  assert long["train_ldm"]["num_steps"] > demo["train_ldm"]["num_steps"]
  assert long["preset"] == "demo_long"


# (field, bad value, what the message must say is allowed): one or more per section.
BAD_VALUES = [
    ("preset", "huge", "one of 'demo', 'demo_long', 'paper', 'test'"),
    ("seed", -1, "integer >= 0"),
    ("stages", ("autoencoder", "sample"), "'samples'"),
    ("data.covariates", ("age", "age"), "distinct"),
    ("data.shape", (32, 31, 32), "multiples of 2"),
    ("data.spacing", 0.0, "(0, 100]"),
    ("data.clip_percentiles", (99.5, 0.5), "low < high"),
    ("data.val_fraction", 1.0, "[0, 1)"),
    ("data.num_workers", -2, ">= 0"),
    ("data.synthetic.num_subjects", 1, ">= 2"),
    ("autoencoder.channels", (8, 10), "multiples of autoencoder.norm_num_groups=4"),
    ("autoencoder.attention_levels", (False,), "2 booleans"),
    ("autoencoder.num_res_blocks", 0, ">= 1 or 2 of them"),
    ("autoencoder.latent_channels", 0, ">= 1"),
    ("autoencoder.in_channels", 2, "one of 1"),
    ("autoencoder.dtype", "float64", "'bfloat16'"),
    ("autoencoder.conv_impl", "native", "nn.ops.set_backend"),
    ("discriminator.num_layers_d", 0, ">= 1"),
    ("unet.norm_num_groups", 0, ">= 1"),
    ("unet.num_head_channels", (0, 8, 6), "divisor of 16"),
    ("unet.with_conditioning", False, "one of True"),
    ("unet.in_channels", 3, "follows from data.covariates"),
    ("unet.cross_attention_dim", 5, "follows from data.covariates"),
    ("diffusion.schedule", "linear", "'scaled_linear_beta'"),
    ("diffusion.beta_end", 0.001, "at least diffusion.beta_start=0.0015"),
    ("diffusion.prediction_type", "eps", "'v_prediction'"),
    ("diffusion.num_train_timesteps", 0, ">= 1"),
    ("sampling.sampler", "euler", "choose one of ddpm, ddim, dpmpp_2m"),
    ("sampling.num_steps", 2000, "[1, 1000]"),
    ("sampling.eta", 1.5, "[0, 1]"),
    ("sampling.timestep_spacing", "trailing", "'leading'"),
    ("sampling.guidance_scale", 3.0, "train_ldm.cond_drop_prob"),
    ("train_ae.batch_size", 0, ">= 1"),
    ("train_ae.learning_rate", 0.0, "(0, "),
    ("train_ae.kl_weight", -1e-6, "[0, "),
    ("train_ae.lr_schedule", "linear", "'cosine'"),
    ("train_ae.lr_decay_fraction", 0.0, "(0, 1]"),
    ("train_ae.patch_shape", (16, 16, 15), "multiples of 2"),
    ("train_ae.patch_shape", (16, 16), "multiples of 2"),
    ("train_ae.patch_shape", (16, 16, 34), "at most data.shape"),
    ("train_ae.perceptual_weights_path", "/nonexistent/resnet_10.pth", "MedicalNet"),
    ("train_ldm.cond_drop_prob", 1.5, "[0, 1]"),
    ("train_ldm.ema_decay", 1.01, "[0, 1]"),
    ("train_ldm.latent", "mode", "'sample'"),
    ("train_ldm.scale_factor", "auto", "'std' or a positive number"),
    ("train_ldm.checkpoint_every", 0, ">= 1"),
    ("mesh.data", 0, "-1"),
    ("mesh.fsdp", 0, ">= 1"),
]


@pytest.mark.parametrize("field,value,allowed", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_a_bad_value_names_its_field_and_what_is_allowed(field, value, allowed):
  config = presets.base_config("test")
  *sections, name = field.split(".")
  section = config
  for s in sections:
    section = section[s]
  section[name] = value
  with pytest.raises(ConfigError) as error:
    config_checks.check_config(config)
  message = str(error.value)
  assert message.startswith(f"{field}="), message
  assert allowed in message, message
  assert "\n" not in message


def test_network_sizes_follow_the_covariates():
  config = presets.base_config("test")
  config.data.covariates = ("age", "sex")
  config.autoencoder.latent_channels = 4
  assert (config.unet.in_channels, config.unet.out_channels, config.unet.cross_attention_dim) == (
      6, 4, 2)
  config_checks.check_config(config)
  assert json.loads(config.to_json_best_effort())["unet"]["in_channels"] == 6
  # A size set by hand no longer follows, and is named when it disagrees.
  config.unet.in_channels = 6
  config.data.covariates = ("age",)
  assert config.unet.cross_attention_dim == 1 and config.unet.in_channels == 6
  with pytest.raises(ConfigError, match=r"unet.in_channels=6: allowed 5, which follows"):
    config_checks.check_config(config)


def test_network_sizes_survive_copies():
  # A copied or pickled config keeps following its own covariates.
  config = copy.deepcopy(presets.base_config("test"))
  config.data.covariates = ("age", "sex", "brain_volume")
  assert config.unet.in_channels == 6
  assert pickle.loads(pickle.dumps(config)).unet.cross_attention_dim == 3


def test_library_errors_for_config_values_are_config_errors():
  with pytest.raises(ConfigError, match="diffusion.schedule='cos'"):
    schedules.make_schedule("cos")
  with pytest.raises(ConfigError, match="diffusion.num_train_timesteps=0"):
    schedules.make_schedule("linear_beta", 0)
  with pytest.raises(ConfigError, match="diffusion.prediction_type='x0'"):
    losses.check_prediction_type("x0")
  with pytest.raises(ConfigError, match="unet.dtype"):
    layers.as_dtype("float9")
  with pytest.raises(ConfigError,
                     match="preset='large': allowed one of demo, demo_long, paper, test"):
    presets.parse_preset("large")


def _cli(*args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "brain_ldm_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_cli_unknown_preset_is_one_line():
  result = _cli("--config=configs/ldm.py:large", "--workdir=unused")
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  assert result.stderr.strip().splitlines() == [
      "error: preset='large': allowed one of demo, demo_long, paper, test "
      "(e.g. --config=configs/ldm.py:paper)"]


def test_cli_bad_field_is_one_line_before_any_work(tmp_path):
  workdir = tmp_path / "run"
  result = _cli("--config=configs/ldm.py:test", f"--workdir={workdir}",
                "--config.data.covariates=('age','sex')", "--config.unet.cross_attention_dim=4")
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  assert _error_lines(result.stderr) == [
      "error: unet.cross_attention_dim=4: allowed 2, which follows from data.covariates (2) and "
      "autoencoder.latent_channels (3); leave it unset to follow them"]
  assert not workdir.exists(), "nothing is made before the config is checked"


def test_cli_prints_the_resolved_config_and_writes_it_before_the_job(tmp_path):
  result = _cli("--config=configs/ldm.py:test", "--print_config",
                "--config.data.covariates=('age','sex','brain_volume')")
  assert result.returncode == 0, result.stderr
  printed = json.loads(result.stdout)
  assert printed["unet"]["in_channels"] == 6 and printed["unet"]["cross_attention_dim"] == 3
  assert printed["data"]["covariates"] == ["age", "sex", "brain_volume"]
  # A job writes the same file before it starts, even when the job itself then stops.
  workdir = tmp_path / "counterfactual"
  result = _cli("--config=configs/counterfactual.py:test", f"--workdir={workdir}")
  assert result.returncode == 2 and _error_lines(result.stderr) == [
      "error: give exactly one of counterfactual.change (e.g. 'age=+10') and "
      "counterfactual.targets_tsv (participant_id + target columns)"], result.stderr
  written = json.loads((workdir / "config.json").read_text())
  assert written["job"] == "counterfactual" and written["counterfactual"]["change"] is None
  # Except generate's: its workdir is the dataset, which holds nothing but the dataset.
  workdir = tmp_path / "generate"
  result = _cli("--config=configs/generate.py:test", f"--workdir={workdir}")
  assert result.returncode == 2 and _error_lines(result.stderr) == [
      "error: generate.run_dir is empty: set --config.generate.run_dir to the workdir of a "
      "trained run (the one holding run.json)"], result.stderr
  assert not (workdir / "config.json").exists()
