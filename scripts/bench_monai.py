"""MONAI's side of scripts/benchmark.py: the same networks in torch, with our weights.

Imports torch: scripts/benchmark.py imports this module once the thread count is set.
"""

from __future__ import annotations

import numpy as np
import torch

# Where MONAI runs: "cpu" here; scripts/benchmark_gpu.py sets "cuda" for the same cases on a GPU
# (the other modules read it as bench_monai.TORCH_DEVICE, so that they see the setting).
TORCH_DEVICE = "cpu"
_EXTRA = ("remat", "dtype")


def torch_sync():
  """Waits for MONAI's queued GPU work (a CUDA call returns before the kernels finish)."""
  if TORCH_DEVICE != "cpu":
    torch.cuda.synchronize()


def torch_nchw(x: np.ndarray):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))).to(TORCH_DEVICE)


def torch_tensor(x: np.ndarray):
  return torch.from_numpy(np.asarray(x)).to(TORCH_DEVICE)


def monai_kwargs(section) -> dict:
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in section.items()
          if k not in _EXTRA}


def fill_zero_weights(model, seed: int = 0):
  """MONAI zero-initialises some convolutions (the UNet's output, res-block conv2, proj_out):
  give them fan-in-scaled normal values so the network is not (partly) the zero function."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim >= 2 and not torch.any(p != 0):
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p[0].numel()))
  return model


def monai_and_flax(kind: str, section, *, remat: bool = False, seed: int = 0):
  """(MONAI torch module in eval mode, our Flax module, its variables) with the same weights."""
  from monai.networks import nets  # pylint: disable=g-import-not-at-top

  from brain_ldm_jax import nn as bnn  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  cls, build = {"unet": (nets.DiffusionModelUNet, bnn.build_unet),
                "autoencoder": (nets.AutoencoderKL, bnn.build_autoencoder)}[kind]
  ref = fill_zero_weights(cls(**monai_kwargs(section)), seed).eval()
  model = build(section).clone(remat=remat)
  variables = bnn.monai_to_flax(ref.state_dict(), kind, model)
  return ref.to(TORCH_DEVICE), model, variables


def load_into_monai(module, variables, kind):
  from brain_ldm_jax import nn as bnn  # pylint: disable=g-import-not-at-top
  state = {k: torch.from_numpy(v) for k, v in bnn.flax_to_monai(variables, kind).items()}
  module.load_state_dict(state, strict=True)
  return module.to(TORCH_DEVICE)


def torch_unet_call(unet, z, cond, t):
  """MONAI UNet with Pinaya et al.'s hybrid conditioning (channels + cross-attention token)."""
  maps = cond[:, :, None, None, None].expand(-1, -1, *z.shape[2:])
  return unet(torch.cat([z, maps], 1), timesteps=t, context=cond[:, None, :])
