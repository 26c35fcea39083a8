"""Forward and forward+backward time of our networks vs MONAI (same weights, same CPU, same threads).

    python scripts/benchmark_networks.py                   # demo AE, demo UNet, paper latent UNet/4
    python scripts/benchmark_networks.py --paper_width_divisor=1 --runs=2   # the full paper UNet

Cases: the `demo` preset's autoencoder on its data shape, the `demo` UNet on the demo latent shape,
and the UNet at the paper's latent size (20×28×20) with the paper's channels divided by
`--paper_width_divisor` (the full paper UNet takes ~7 s per MONAI forward on 2 cores). Weights are
MONAI's initialisation converted with `monai_to_flax`. Times are medians over `--runs` after one
warm-up (compilation excluded), ours and MONAI interleaved (`harness.interleaved`);
forward+backward is the gradient of a mean-square loss with respect to all parameters. The printed ratio is ours / MONAI (< 1: we are faster).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import harness

# jax is imported in main() after --threads has set XLA's thread count.
jax = jnp = bnn = presets = None
_EXTRA = ("remat", "dtype")


def _jax_fns(model, variables, args, kwargs, output_index=None):
  """Forward and forward+backward (gradient of a mean-square loss) as blocking calls."""
  def out(v):
    y = model.apply(v, *args, **kwargs)
    return y[output_index] if output_index is not None else y

  fwd = jax.jit(out)
  grad = jax.jit(jax.grad(lambda v: jnp.mean(jnp.square(out(v)))))
  return (lambda: jax.block_until_ready(fwd(variables)),
          lambda: jax.block_until_ready(grad(variables)))


def _torch_fns(torch, model, args, kwargs, output_index=None):
  def out():
    y = model(*args, **kwargs)
    return y[output_index] if output_index is not None else y

  def fwd():
    with torch.no_grad():
      out()

  def bwd():
    model.zero_grad(set_to_none=True)
    torch.mean(torch.square(out())).backward()

  return fwd, bwd


def _case_autoencoder(torch, nets, cfg, batch):
  section = cfg.autoencoder
  kwargs = {k: v for k, v in section.items() if k not in _EXTRA}
  ref = nets.AutoencoderKL(**kwargs)
  model = bnn.build_autoencoder(section).clone(remat=False)
  variables = bnn.monai_to_flax(ref.state_dict(), "autoencoder", model)
  shape = (batch,) + tuple(cfg.data.shape) + (section.in_channels,)
  x = np.random.default_rng(0).random(shape, np.float32)
  xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
  return (f"AE {cfg.preset} ch={tuple(section.channels)}", shape,
          (model, variables, (x, jax.random.key(0)), {}, 0),
          (ref, (xt,), {}, 0))


def _case_unet(torch, nets, section, spatial, batch, name):
  kwargs = {k: v for k, v in section.items() if k not in _EXTRA}
  ref = nets.DiffusionModelUNet(**kwargs)
  model = bnn.build_unet(section).clone(remat=False)
  variables = bnn.monai_to_flax(ref.state_dict(), "unet", model)
  rng = np.random.default_rng(0)
  shape = (batch,) + tuple(spatial) + (section.in_channels,)
  x = rng.standard_normal(shape, np.float32)
  t = rng.integers(0, 1000, (batch,))
  c = rng.random((batch, 1, section.cross_attention_dim), np.float32)
  xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
  return (name, shape, (model, variables, (x, t), {"context": c}, None),
          (ref, (xt, torch.from_numpy(t)), {"context": torch.from_numpy(c)}, None))


COLUMNS = [("case", "l"), ("input", "l"), ("ours fwd", "r"), ("MONAI fwd", "r"), ("ratio", "r"),
           ("ours f+b", "r"), ("MONAI f+b", "r"), ("ratio", "r")]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--paper_width_divisor", type=int, default=4,
                      help="paper UNet channels / this at latent 20x28x20; 0 skips the case")
  parser.add_argument("--conv_impl", default="auto", help="the backend (nn.ops.BACKENDS)")
  parser.add_argument("--cases", default="ae,unet,paper_unet")
  parser.add_argument("--threads", type=int, default=0,
                      help="threads for both XLA and torch (0: all CPUs); 1 is the fairest "
                           "comparison on a machine shared with other jobs")
  args = parser.parse_args()

  threads = harness.set_threads(args.threads)
  global jax, jnp, bnn, presets
  import jax  # pylint: disable=g-import-not-at-top,redefined-outer-name
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,redefined-outer-name
  import torch  # pylint: disable=g-import-not-at-top
  from monai.networks import nets  # pylint: disable=g-import-not-at-top

  from brain_ldm_jax import nn as bnn  # pylint: disable=g-import-not-at-top,redefined-outer-name
  from brain_ldm_jax import presets  # pylint: disable=g-import-not-at-top,redefined-outer-name
  from brain_ldm_jax.nn import ops  # pylint: disable=g-import-not-at-top

  ops.set_backend(args.conv_impl)
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  demo = presets.base_config("demo")
  latent = tuple(s // 2 ** (len(demo.autoencoder.channels) - 1) for s in demo.data.shape)
  cases = []
  wanted = args.cases.split(",")
  if "ae" in wanted:
    cases.append(_case_autoencoder(torch, nets, demo, args.batch))
  if "unet" in wanted:
    cases.append(_case_unet(torch, nets, demo.unet, latent, args.batch,
                            f"UNet demo ch={tuple(demo.unet.channels)}"))
  if "paper_unet" in wanted and args.paper_width_divisor:
    paper = presets.base_config("paper")
    section = paper.unet
    div = args.paper_width_divisor
    section.channels = tuple(c // div for c in section.channels)
    section.num_head_channels = tuple(c // div for c in section.num_head_channels)
    paper_latent = tuple(s // 8 for s in paper.data.shape)  # 160x224x160 / 8 = 20x28x20
    cases.append(_case_unet(torch, nets, section, paper_latent, args.batch,
                            f"UNet paper/{div} ch={tuple(section.channels)}"))

  print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, XLA {threads} threads, {os.cpu_count()} CPUs; "
        f"backend {args.conv_impl}; median of {args.runs} after warm-up")
  rows = []
  for name, shape, ours, theirs in cases:
    jf, jb = _jax_fns(*ours)
    tf, tb = _torch_fns(torch, *theirs)
    t = harness.interleaved({"jf": jf, "tf": tf, "jb": jb, "tb": tb}, args.runs)
    rows.append([name, shape, f"{t['jf'] * 1e3:.0f} ms", f"{t['tf'] * 1e3:.0f} ms",
                 f"{t['jf'] / t['tf']:.2f}", f"{t['jb'] * 1e3:.0f} ms", f"{t['tb'] * 1e3:.0f} ms",
                 f"{t['jb'] / t['tb']:.2f}"])
  print("\n".join(harness.markdown_table(COLUMNS, rows)), flush=True)


if __name__ == "__main__":
  main()
