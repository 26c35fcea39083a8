"""3D MS-SSIM throughput: brain_ldm_jax vs MONAI's MultiScaleSSIMMetric on this CPU.

Sizes: the demo volume 40x56x40 and the paper's 160x224x160. With MONAI's default 11-voxel
window neither fits five scales (the coarsest scale must still hold a full window), so both
implementations run the largest valid number of scales with the first standard weights
renormalised: 2 scales at 40x56x40, 4 at 160x224x160 (MONAI's own size check agrees on both).

  python scripts/benchmark_metrics.py [--pairs-small 16] [--pairs-large 2] [--batch 8]
"""

import argparse

import jax
import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric

import harness
from brain_ldm_jax.metrics import ssim as S
from brain_ldm_jax.nn import ops

COLUMNS = [("size", "l"), ("scales", "r"), ("pairs", "r"), ("ours pairs/s", "r"),
           ("MONAI pairs/s", "r"), ("ratio", "r"), ("max |diff|", "r")]

def bench(shape, pairs, batch, repeats):
  rng = np.random.default_rng(0)
  x = rng.random((pairs, *shape, 1), np.float32)
  y = np.clip(x + 0.1 * rng.standard_normal(x.shape, np.float32), 0, 1)
  weights = S.ms_ssim_weights_for(shape)
  b = min(batch, pairs)

  def ours():
    for s in range(0, pairs, b):
      jax.block_until_ready(S.ms_ssim(x[s:s + b], y[s:s + b], spatial_dims=3, weights=weights))

  metric = MultiScaleSSIMMetric(spatial_dims=3, weights=weights, reduction="none")
  tx = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
  ty = torch.from_numpy(np.moveaxis(y, -1, 1).copy())

  def theirs():
    with torch.no_grad():
      for s in range(0, pairs, b):
        metric(tx[s:s + b], ty[s:s + b])

  a = np.asarray(S.ms_ssim(x[:b], y[:b], spatial_dims=3, weights=weights))
  with torch.no_grad():
    m = metric(tx[:b], ty[:b]).numpy().reshape(-1)
  t = harness.interleaved({"ours": ours, "monai": theirs}, repeats)
  return len(weights), pairs / t["ours"], pairs / t["monai"], float(np.abs(a - m).max())


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--pairs-small", type=int, default=16)
  p.add_argument("--pairs-large", type=int, default=2)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=2)
  args = p.parse_args()
  ops.set_backend()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)")
  rows = []
  for shape, pairs in (((40, 56, 40), args.pairs_small), ((160, 224, 160), args.pairs_large)):
    n, ours, monai, diff = bench(shape, pairs, args.batch, args.repeats)
    rows.append(["x".join(map(str, shape)), n, pairs, f"{ours:.2f}", f"{monai:.2f}",
                 f"{ours / monai:.1f}x", f"{diff:.1e}"])
  print("\n".join(harness.markdown_table(COLUMNS, rows)))


if __name__ == "__main__":
  main()
