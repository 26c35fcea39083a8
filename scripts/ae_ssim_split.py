"""Where a run's autoencoder loses SSIM: in the brain or on the background.

    python scripts/ae_ssim_split.py WORKDIR [STEP ...]

For each autoencoder checkpoint (default: the latest) prints `ae_val_ssim` (the summary's number:
mean SSIM of the validation brains' clipped reconstructions), that SSIM map averaged where the
image exceeds 0.05 ("in brain") and elsewhere ("background"), and the mean unclipped
reconstruction where the image is below 0.02 ("offset"). SSIM on a near-zero background punishes
any positive offset (docs/summary.md, "The autoencoder's background").
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from brain_ldm_jax import evaluate
from brain_ldm_jax import networks
from brain_ldm_jax import run_dir
from brain_ldm_jax.metrics import ssim as ssim_lib
from brain_ldm_jax.nn import autoencoder as autoencoder_lib
from brain_ldm_jax.train import checkpoint as checkpoint_lib
from brain_ldm_jax.train import pipeline

BRAIN_ABOVE = 0.05
BACKGROUND_BELOW = 0.02


def _valid_region(volume: np.ndarray, map_shape) -> np.ndarray:
  """`volume` cut to the SSIM map's (valid-window) region, centred."""
  pad = [(n - m) // 2 for n, m in zip(volume.shape, map_shape)]
  return volume[tuple(slice(p, p + m) for p, m in zip(pad, map_shape))]


def split(autoencoder, params, volumes: np.ndarray) -> dict[str, float]:
  @jax.jit
  def reconstruct(x):
    mean, _ = autoencoder.apply({"params": params}, x[None, ..., None], method="encode")
    raw = autoencoder.apply({"params": params}, mean, method="decode")
    ssim_map, _ = ssim_lib.ssim_and_cs_maps(x[None, ..., None], networks.as_image(raw),
                                            spatial_dims=3)
    return raw[0, ..., 0], ssim_map[0, ..., 0]

  rows = []
  for x in volumes:
    raw, ssim_map = (np.asarray(a) for a in reconstruct(jnp.asarray(x)))
    brain = _valid_region(x, ssim_map.shape) > BRAIN_ABOVE
    rows.append((ssim_map.mean(), ssim_map[brain].mean(), ssim_map[~brain].mean(),
                 raw[x < BACKGROUND_BELOW].mean()))
  return dict(zip(("ae_val_ssim", "in_brain", "background", "offset"), np.mean(rows, axis=0)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdir")
  parser.add_argument("steps", nargs="*", type=int, help="checkpoint steps (default: latest)")
  args = parser.parse_args()
  config = ml_collections.ConfigDict(run_dir.read_run_info(args.workdir)["config"])
  _, val, _ = pipeline.prepare_data(config, args.workdir)
  volumes = evaluate.subject_volumes(val, config.data)
  autoencoder = autoencoder_lib.build_autoencoder(config.autoencoder)
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(args.workdir, run_dir.AE_DIR))
  print(f"{'step':>7} {'ae_val_ssim':>11} {'in brain':>9} {'background':>10} {'offset':>8}")
  for step in args.steps or [None]:
    step, tree = checkpointer.restore_subtree("params", step)
    s = split(autoencoder, jax.tree.map(jnp.asarray, tree), volumes)
    print(f"{step:>7} {s['ae_val_ssim']:>11.4f} {s['in_brain']:>9.4f} {s['background']:>10.4f} "
          f"{s['offset']:>+8.4f}")
  checkpointer.close()


if __name__ == "__main__":
  main()
