r"""Convert MONAI weights (e.g. the published brain LDM bundle) into a run the sampler can load.

    python scripts/convert_monai.py --config=configs/ldm.py:paper \
        --autoencoder=models/autoencoder.pth --unet=models/diffusion_model.pth \
        --covariate_ranges=age=44:82,sex=0:1,ventricular_volume=7:171,brain_volume=LO:HI \
        --scale_factor=1.0 --out=runs/bundle

Then, in Python: `run = brain_ldm_jax.api.load_run("runs/bundle")`. The network sections of the
config must match the checkpoint (the paper preset matches the bundle). Files are read with
`torch.load(weights_only=True)`, safetensors or npz: loading never runs code from the file.

`--covariate_ranges` gives the training cohort's min:max per covariate in natural units; the
bundle's networks saw covariates min-max scaled to [0, 1] with the cohort's ranges, so they are
needed to turn "age 70" into the number the network was trained on.

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
                              "name=min:max,... for every covariate, natural units.")
_SCALE = flags.DEFINE_float("scale_factor", 1.0, "Latent scale factor the LDM was trained with.")
_OUT = flags.DEFINE_string("out", None, "Run directory to write (or, with --export, to read).")
_EXPORT = flags.DEFINE_string("export", None, "Export the run in --out as MONAI weights into this folder.")


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
  return manifest.CovariateStats(tuple(names), tuple(ranges[n][0] for n in names),
                                 tuple(ranges[n][1] for n in names))


def import_run(config, ae_path: str, unet_path: str, stats, scale_factor: float, out: str):
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
  if not (_AE.value and _UNET.value and _RANGES.value):
    raise app.UsageError("--autoencoder, --unet and --covariate_ranges are required")
  config = _CONFIG.value
  try:
    stats = parse_ranges(_RANGES.value, tuple(config.data.covariates))
    import_run(config, _AE.value, _UNET.value, stats, _SCALE.value, _OUT.value)
  except (UserError, ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(f"wrote run {_OUT.value}; load it with brain_ldm_jax.api.load_run({_OUT.value!r})")


if __name__ == "__main__":
  app.run(main)
