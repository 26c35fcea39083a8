"""The published MONAI bundle `brain_image_synthesis_latent_diffusion_model` as an import.

The bundle's weights cannot be downloaded here, so a MONAI `DiffusionModelUNet` is built with the
bundle's network arguments (its configs/inference.json) and random weights, converted with
`scripts/convert_monai.py --bundle`, and sampled through `api` with covariates given by name. The
UNet must then see exactly what the bundle's own sampler (scripts/sampler.py) gives it: the
conditioning tensor [[gender, age, ventricular_vol, brain_vol]] as 4 channels after the 3 latent
channels and as the cross-attention context, and the DDIM trajectory of MONAI's DDIMScheduler.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import import_reference
from test_nn_parity import randomise, rel_err

from brain_ldm_jax import api
from brain_ldm_jax import presets
from brain_ldm_jax.nn import autoencoder as autoencoder_lib
from brain_ldm_jax.nn import convert
from brain_ldm_jax.nn import unet as unet_lib

torch = import_reference("torch")
monai = import_reference("monai")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/inference.json of the bundle: "autoencoder_def", "diffusion_def" (553M parameters) and
# "scheduler".
BUNDLE_AUTOENCODER = dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=3,
                          channels=[64, 128, 128, 128], num_res_blocks=2, norm_num_groups=32,
                          norm_eps=1e-6, attention_levels=[False, False, False, False],
                          with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
BUNDLE_UNET = dict(spatial_dims=3, in_channels=7, out_channels=3, channels=[256, 512, 768],
                   num_res_blocks=2, attention_levels=[False, True, True], norm_num_groups=32,
                   norm_eps=1e-6, resblock_updown=True, num_head_channels=[0, 512, 768],
                   with_conditioning=True, transformer_num_layers=1, cross_attention_dim=4,
                   upcast_attention=True, use_flash_attention=False)
BUNDLE_SCHEDULER = dict(num_train_timesteps=1000, schedule="scaled_linear_beta",
                        beta_start=0.0015, beta_end=0.0205, clip_sample=False)
# The same network at CPU-test width: every structural and conditioning argument is the bundle's,
# only the widths shrink (one attention head per level, as the bundle's num_head_channels = width).
SMALL_UNET = dict(BUNDLE_UNET, channels=[32, 64, 64], num_head_channels=[0, 64, 64])
SMALL_OVERRIDES = ("--config.unet.channels=(32,64,64)", "--config.unet.num_head_channels=(0,64,64)",
                   "--config.unet.num_res_blocks=2", "--config.unet.norm_num_groups=32",
                   "--config.data.shape=(16,16,16)")  # latent 8^3 under the test autoencoder
# The bundle's inference.json defaults, all different, so that a swap cannot go unnoticed.
GENDER, AGE, VENTRICULAR_VOL, BRAIN_VOL = 1.0, 0.1, 0.2, 0.4


def test_bundle_networks_convert_at_their_exact_size():
  """The bundle's exact networks have our paper preset's keys and shapes (torch's meta device)."""
  nets = monai.networks.nets
  paper = presets.base_config("paper")
  for reference, ours in ((lambda: nets.DiffusionModelUNet(**BUNDLE_UNET),
                           unet_lib.build_unet(paper.unet)),
                          (lambda: nets.AutoencoderKL(**BUNDLE_AUTOENCODER),
                           autoencoder_lib.build_autoencoder(paper.autoencoder))):
    with torch.device("meta"):
      want = {k: tuple(v.shape) for k, v in reference().state_dict().items()}
    assert convert.monai_shapes(ours) == want


@pytest.fixture(scope="module")
def bundle_run(tmp_path_factory):
  """MONAI networks (random weights; the bundle's UNet structure) and the run converted from them."""
  tmp = tmp_path_factory.mktemp("bundle")
  config = presets.base_config("test")
  torch.manual_seed(0)
  ae_kwargs = {k: v for k, v in config.autoencoder.items() if k not in ("remat", "dtype")}
  autoencoder = monai.networks.nets.AutoencoderKL(**ae_kwargs).eval()
  # Every weight random: MONAI zero-initialises the UNet's output convolution.
  unet = randomise(monai.networks.nets.DiffusionModelUNet(**SMALL_UNET), seed=1)
  torch.save(autoencoder.state_dict(), tmp / "autoencoder.pt")
  torch.save(unet.state_dict(), tmp / "model.pt")
  out = tmp / "run"
  result = subprocess.run(
      [sys.executable, "scripts/convert_monai.py", "--bundle", "--config=configs/ldm.py:test",
       *SMALL_OVERRIDES, f"--autoencoder={tmp / 'autoencoder.pt'}",
       f"--unet={tmp / 'model.pt'}", f"--out={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return api.load_run(str(out)), autoencoder, unet


def test_bundle_run_stores_the_bundle_semantics(bundle_run):
  run, _, _ = bundle_run
  assert tuple(run.config.data.covariates) == ("sex", "age", "ventricular_volume", "brain_volume")
  assert run.stats.names == tuple(run.config.data.covariates)
  assert run.stats.minimum == (0.0,) * 4 and run.stats.maximum == (1.0,) * 4  # given in [0, 1]
  assert run.scale_factor == 1.0  # the bundle decodes its latent unscaled
  assert (run.config.sampling.sampler, run.config.sampling.num_steps,
          run.config.sampling.timestep_spacing) == ("ddim", 50, "monai")
  for name, value in SMALL_UNET.items():
    if name != "use_flash_attention":
      got = run.config.unet[name]
      assert (list(got) if isinstance(got, (tuple, list)) else got) == value, name


def _bundle_sampler(noise, autoencoder, unet, conditioning, num_steps):
  """scripts/sampler.py of the bundle, with inference.json's scheduler; records the UNet inputs."""
  scheduler = monai.networks.schedulers.DDIMScheduler(**BUNDLE_SCHEDULER)
  scheduler.set_timesteps(num_inference_steps=num_steps)
  image = noise
  cond_concat = conditioning.squeeze(1).unsqueeze(-1).unsqueeze(-1).unsqueeze(-1)
  cond_concat = cond_concat.expand(list(cond_concat.shape[0:2]) + list(noise.shape[2:]))
  inputs = []
  with torch.no_grad():
    for t in scheduler.timesteps:
      inputs.append((int(t), torch.cat((image, cond_concat), dim=1).numpy().copy(),
                     conditioning.numpy().copy()))
      model_output = unet(torch.cat((image, cond_concat), dim=1),
                          timesteps=torch.Tensor((t,)).long(), context=conditioning)
      image, _ = scheduler.step(model_output, t, image)
    return inputs, autoencoder.decode_stage_2_outputs(image).numpy()


class _RecordingUNet:
  """Our UNet, recording (t, input, context) of every call the compiled sampler makes."""

  def __init__(self, module, log):
    self.module, self.log = module, log

  def apply(self, variables, x, t, context=None):
    jax.debug.callback(lambda *a: self.log.append(tuple(np.array(v) for v in a)), t, x, context)
    return self.module.apply(variables, x, t, context=context)


def test_named_covariates_reach_the_bundle_inputs_and_trajectory(bundle_run, monkeypatch):
  run, autoencoder, unet = bundle_run
  log = []
  build = unet_lib.build_unet
  monkeypatch.setattr(api.unet_lib, "build_unet", lambda cfg: _RecordingUNet(build(cfg), log))
  sample = api.make_sampler(run)
  # By name, in an order unlike the bundle's.
  ours = np.asarray(sample(run.params, jax.random.key(0),
                           {"age": [AGE], "brain_volume": [BRAIN_VOL], "sex": [GENDER],
                            "ventricular_volume": [VENTRICULAR_VOL]}))
  log.sort(key=lambda entry: -int(entry[0][0]))
  assert len(log) == 50

  # configs/inference.json's conditioning tensor, fed to scripts/sampler.py from our initial noise.
  conditioning = torch.tensor([[GENDER, AGE, VENTRICULAR_VOL, BRAIN_VOL]]).unsqueeze(1)
  noise = torch.from_numpy(np.moveaxis(log[0][1][..., :3], -1, 1).copy())
  inputs, image = _bundle_sampler(noise, autoencoder, unet, conditioning, 50)

  t0, x0, context0 = log[0]
  want_t0, want_x0, want_context0 = inputs[0]
  assert int(t0[0]) == want_t0 == 999
  # The same numbers in the same places: the covariate channels after the latent, and the context.
  np.testing.assert_array_equal(np.moveaxis(x0, -1, 1), want_x0)
  np.testing.assert_array_equal(context0, want_context0)
  for (t, x, context), (want_t, want_x, want_context) in zip(log, inputs):
    assert int(t[0]) == want_t  # MONAI's listing: 999, 979, 958, ...
    assert rel_err(np.moveaxis(x, -1, 1), want_x) < 1e-5, want_t  # and its steps of T // N
    np.testing.assert_array_equal(context, want_context)
  # The decoded brain (ours is clipped to [0, 1]).
  want = np.clip(image[:, 0], 0.0, 1.0)
  assert 0.05 < np.mean((want > 0) & (want < 1))  # not saturated: the comparison means something
  assert rel_err(ours, want) < 1e-5
