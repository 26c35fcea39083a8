r"""Convert MONAI weights into a run the sampler can load; `--bundle` for the published model.

The published MONAI bundle `brain_image_synthesis_latent_diffusion_model`:

    python scripts/convert_monai.py --bundle \
        --autoencoder=models/autoencoder.pt --unet=models/model.pt --out=runs/bundle

Then, in Python, `api.make_sampler(api.load_run("runs/bundle"))` takes the bundle's covariates
by name, each in [0, 1] as the bundle takes them: {"sex": ..., "age": ..., "ventricular_volume":
..., "brain_volume": ...}. `--bundle` stores the bundle's covariate order (its conditioning
tensor is [[gender, age, ventricular_vol, brain_vol]]), identity scaling of its [0, 1] values
(or, with `--covariate_ranges` in natural units, min-max scaling by those ranges), the latent
scale factor 1 (the bundle decodes the latent unscaled) and its sampler: DDIM, 50 steps, MONAI
1.6's stepping rule (`sampling.timestep_spacing="monai"`, unless the config sets a spacing).

Weights of any other MONAI model:

    python scripts/convert_monai.py --config=configs/ldm.py:paper \
        --autoencoder=ae.pt --unet=unet.pt \
        --covariate_ranges=age=44:82,sex=0:1,ventricular_volume=LO:HI,brain_volume=LO:HI \
        --scale_factor=1.0 --out=runs/converted

`--covariate_ranges` gives the training cohort's min:max per covariate of `data.covariates` in
natural units: the networks saw covariates min-max scaled to [0, 1] with those ranges. The
network sections of the config must match the checkpoint (the paper preset matches the bundle),
and the UNet's input sizes must follow from `data.covariates`. Files are read with
`torch.load(weights_only=True)`, safetensors or npz: loading never runs code from the file.

With --export, it goes the other way: a run's weights to MONAI-core state dicts (.pt if torch is
installed, else .npz) that load into MONAI with `load_state_dict(..., strict=True)`.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from brain_ldm_jax import api
from brain_ldm_jax import config_checks
from brain_ldm_jax.data import manifest
from brain_ldm_jax.data import nifti
from brain_ldm_jax.errors import ConfigError, UserError
from brain_ldm_jax.nn import autoencoder as autoencoder_lib
from brain_ldm_jax.nn import convert
from brain_ldm_jax.nn import unet as unet_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ldm.py:paper",
                                          "Run config whose networks match the checkpoint.")
_AE = flags.DEFINE_string("autoencoder", None, "MONAI AutoencoderKL weights (.pt/.pth/.safetensors/.npz).")
_UNET = flags.DEFINE_string("unet", None, "MONAI DiffusionModelUNet weights.")
_RANGES = flags.DEFINE_string("covariate_ranges", None,
                              "name=min:max,... for every covariate, natural units (with "
                              "--bundle: optional; without it covariates are given in [0, 1]).")
_SCALE = flags.DEFINE_float("scale_factor", 1.0, "Latent scale factor the LDM was trained with "
                            "(the bundle's: 1, it decodes the latent unscaled).")
_BUNDLE = flags.DEFINE_bool("bundle", False,
                            "The weights are the published MONAI bundle "
                            "brain_image_synthesis_latent_diffusion_model: use its covariate "
                            "order, [0, 1] covariates and sampler.")
_OUT = flags.DEFINE_string("out", None, "Run directory to write (or, with --export, to read).")
_EXPORT = flags.DEFINE_string("export", None, "Export the run in --out as MONAI weights into this folder.")


# The published bundle (configs/inference.json and scripts/sampler.py of
# brain_image_synthesis_latent_diffusion_model): the conditioning tensor is
# [[gender, age, ventricular_vol, brain_vol]], each in [0, 1]; the UNet sees it as 4 constant
# channels after the 3 latent channels, in that order, and as the cross-attention context (one
# token). It decodes the sampled latent unscaled and samples with MONAI's DDIMScheduler (default
# listing and step rule), 50 steps. Its networks are the paper preset's.
BUNDLE_COVARIATES = ("sex", "age", "ventricular_volume", "brain_volume")
BUNDLE_NUM_STEPS = 50


def bundle_config(config):
  """`config` with the bundle's covariate order and sampler (a spacing the config sets wins)."""
  config = config.copy_and_resolve_references()
  config.data.covariates = BUNDLE_COVARIATES
  config.sampling.sampler = "ddim"
  config.sampling.num_steps = BUNDLE_NUM_STEPS
  config.sampling.timestep_spacing = config.sampling.timestep_spacing or "monai"
  return config


def bundle_stats(ranges_text: str | None) -> manifest.CovariateStats:
  """Identity scaling (the bundle's [0, 1] values as given), or natural units by known ranges."""
  if ranges_text:
    return parse_ranges(ranges_text, BUNDLE_COVARIATES)
  n = len(BUNDLE_COVARIATES)
  return manifest.CovariateStats(BUNDLE_COVARIATES, (0.0,) * n, (1.0,) * n)


def parse_ranges(text: str, names) -> manifest.CovariateStats:
  ranges = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    try:
      name, span = item.split("=")
      lo, hi = (float(v) for v in span.split(":"))
    except ValueError:
      raise ConfigError(f"--covariate_ranges item {item!r}: expected name=min:max") from None
    ranges[name] = (lo, hi)
  missing = [n for n in names if n not in ranges]
  if missing:
    raise ConfigError(f"--covariate_ranges lacks {', '.join(missing)} (need {', '.join(names)})")
  unknown = sorted(set(ranges) - set(names))
  if unknown:
    raise ConfigError(f"--covariate_ranges names unknown covariates {', '.join(unknown)} "
                      f"(the run's are {', '.join(names)})")
  return manifest.CovariateStats(tuple(names), tuple(ranges[n][0] for n in names),
                                 tuple(ranges[n][1] for n in names))


def import_run(config, ae_path: str, unet_path: str, stats, scale_factor: float, out: str):
  # The UNet's input channels and context size must follow from the covariates the run names.
  config_checks.check_unet(config)
  autoencoder = autoencoder_lib.build_autoencoder(config.autoencoder)
  unet = unet_lib.build_unet(config.unet)
  params = {
      "autoencoder": convert.monai_to_flax(convert.load_state_dict(ae_path), "autoencoder",
                                           autoencoder)["params"],
      "unet": convert.monai_to_flax(convert.load_state_dict(unet_path), "unet", unet)["params"],
  }
  affine = nifti.mni_affine(tuple(config.data.shape), config.data.spacing)
  api.save_run(out, config, params, stats, scale_factor, affine)


def export_run(run_dir: str, out_dir: str) -> list[str]:
  run = api.load_run(run_dir)
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for kind, name in (("autoencoder", "autoencoder"), ("unet", "diffusion_model")):
    state = convert.flax_to_monai(jax.tree.map(np.asarray, run.params[kind]), kind)
    try:
      import torch
      path = os.path.join(out_dir, f"{name}.pt")
      torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    except ImportError:
      path = os.path.join(out_dir, f"{name}.npz")
      convert.save_npz(state, path)
    paths.append(path)
  return paths


def main(argv):
  del argv
  if not _OUT.value:
    raise app.UsageError("--out is required")
  if _EXPORT.value:
    for path in export_run(_OUT.value, _EXPORT.value):
      print(f"wrote {path}")
    return
  if not (_AE.value and _UNET.value and (_RANGES.value or _BUNDLE.value)):
    raise app.UsageError("--autoencoder, --unet and --covariate_ranges (or --bundle) are required")
  config = _CONFIG.value
  try:
    if _BUNDLE.value:
      config, stats = bundle_config(config), bundle_stats(_RANGES.value)
    else:
      stats = parse_ranges(_RANGES.value, tuple(config.data.covariates))
    import_run(config, _AE.value, _UNET.value, stats, _SCALE.value, _OUT.value)
  except (UserError, ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(f"wrote run {_OUT.value}; load it with brain_ldm_jax.api.load_run({_OUT.value!r})")


if __name__ == "__main__":
  app.run(main)
