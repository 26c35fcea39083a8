"""scripts/benchmark.py's network cases: the UNet forward, both train steps, MS-SSIM, memory.

Imports jax and torch: scripts/benchmark.py imports this module once the thread count is set.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
from monai.losses import PatchAdversarialLoss
from monai.metrics import MultiScaleSSIMMetric
from monai.networks import nets
from monai.networks.schedulers import DDPMScheduler
import numpy as np
import torch

import bench_monai
from bench_monai import load_into_monai, monai_and_flax, monai_kwargs, torch_nchw, torch_tensor
from bench_monai import torch_unet_call
from bench_timing import compile_aot, gemm_fn, interleaved, xla_flops
from brain_ldm_jax import networks
from brain_ldm_jax import presets
from brain_ldm_jax import sharding as sharding_lib
from brain_ldm_jax.metrics import ssim
from brain_ldm_jax.nn import ops
from brain_ldm_jax.train import autoencoder as ae_stage
from brain_ldm_jax.train import ldm as ldm_stage


def case_unet(report, args, name, section, spatial, batch=1):
  """UNet forward, ours vs MONAI. section.dtype "bfloat16": MONAI under torch.autocast(bfloat16),
  the mixed precision PyTorch users run (parameters float32 on both sides)."""
  ref, model, variables = monai_and_flax("unet", section)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, *spatial, section.in_channels)).astype(np.float32)
  t = rng.integers(0, 1000, (batch,)).astype(np.int32)
  c = rng.random((batch, 1, section.cross_attention_dim)).astype(np.float32)
  fwd = jax.jit(lambda v, x, t, c: model.apply(v, x, t, context=c))
  compiled, flops, compile_s = compile_aot(fwd, variables, x, t, c)
  xt, tt, ct = torch_nchw(x), torch_tensor(t.astype(np.int64)), torch_tensor(c)
  autocast = torch.autocast(bench_monai.TORCH_DEVICE.split(":")[0], dtype=torch.bfloat16,
                            enabled=section.dtype == "bfloat16")

  def theirs():
    with torch.no_grad(), autocast:
      return ref(xt, timesteps=tt, context=ct)

  y_ours = np.moveaxis(np.asarray(compiled(variables, x, t, c), np.float64), -1, 1)
  y_monai = theirs().double().cpu().numpy()
  rel = np.linalg.norm(y_ours - y_monai) / np.linalg.norm(y_monai)
  times = interleaved({"gemm": gemm_fn(), "ours": lambda: compiled(variables, x, t, c)
                       .block_until_ready(), "monai": theirs}, args.repeats)
  n_params = sum(p.numel() for p in ref.parameters())
  report.compare(name, f"forward, batch {batch}, {'×'.join(map(str, spatial))}", times, flops,
                 f"ch={tuple(section.channels)}, {n_params / 1e6:.1f} M params, {section.dtype}; "
                 f"outputs' rel. L2 difference {rel:.1e}; compile {compile_s:.0f} s")
  return compiled


def paper_unet(args):
  """(section, name, latent spatial shape) of the `unet_paper` and `ddim_paper` cases."""
  section = presets.base_config("paper").unet
  div = args.paper_width_divisor
  section.channels = tuple(c // div for c in section.channels)
  section.num_head_channels = tuple(c // div for c in section.num_head_channels)
  spatial = tuple(int(s) for s in args.paper_latent.split(","))
  return section, f"UNet paper width/{div}" if div > 1 else "UNet paper width", spatial


def case_ae_step(report, args, config=None, name="autoencoder train step (demo)"):
  """`config`: default the demo preset. Its autoencoder.remat is MONAI's use_checkpoint."""
  config = config or presets.base_config("demo")
  # Whole images, as MONAI's step below takes them (the demo itself trains on crops).
  config.train_ae.patch_shape = None
  t = config.train_ae
  mesh = sharding_lib.make_mesh(config.mesh)
  built = ae_stage.build(config, mesh, jax.random.key(0))
  step = built["adversarial_step"]
  holder = {"state": built["init"]()}
  x = np.random.default_rng(0).random((t.batch_size, *config.data.shape, 1), np.float32)
  batch = {"image": sharding_lib.global_batch(x, mesh)}
  compiled, flops, compile_s = compile_aot(step, holder["state"], batch)

  def ours():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics)

  state = holder["state"]
  ae = load_into_monai(nets.AutoencoderKL(**monai_kwargs(config.autoencoder),
                                         use_checkpoint=config.autoencoder.remat),
                       {"params": state.params}, "autoencoder").train()
  disc = load_into_monai(nets.PatchDiscriminator(**monai_kwargs(config.discriminator)),
                         {"params": state.disc_params, "batch_stats": state.disc_batch_stats},
                         "discriminator").train()
  opt_g = torch.optim.Adam(ae.parameters(), lr=t.learning_rate)
  opt_d = torch.optim.Adam(disc.parameters(), lr=t.disc_learning_rate)
  adv = PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)
  xt = torch_nchw(x)

  def theirs():  # MONAI's 3d_ldm tutorial step (no perceptual loss, as ours without weights)
    opt_g.zero_grad(set_to_none=True)
    recon, mu, sigma = ae(xt)
    l1 = torch.mean(torch.abs(recon - xt))
    kl = torch.mean(0.5 * torch.sum(mu.square() + sigma.square() - torch.log(sigma.square()) - 1,
                                    dim=list(range(1, mu.ndim))))
    adv_g = adv(disc(recon.contiguous().float())[-1], target_is_real=True,
                for_discriminator=False)
    (l1 + t.kl_weight * kl + t.adv_weight * adv_g).backward()
    opt_g.step()
    opt_d.zero_grad(set_to_none=True)
    fake = adv(disc(recon.contiguous().detach())[-1], target_is_real=False, for_discriminator=True)
    real = adv(disc(xt)[-1], target_is_real=True, for_discriminator=True)
    (t.adv_weight * 0.5 * (fake + real)).backward()
    opt_d.step()

  times = interleaved({"gemm": gemm_fn(), "ours": ours, "monai": theirs}, args.repeats)
  report.compare(name,
                 f"batch {t.batch_size}, {'×'.join(map(str, config.data.shape))}",
                 times, flops,
                 f"ch={tuple(config.autoencoder.channels)} + discriminator; "
                 f"{1 / times['ours']:.2f} vs {1 / times['monai']:.2f} steps/s; "
                 f"compile {compile_s:.0f} s")
  return compiled


def case_ldm_step(report, args, config=None, name="LDM train step (demo)"):
  """`config`: default the demo preset (MONAI's UNet has no activation checkpointing)."""
  config = config or presets.base_config("demo")
  t = config.train_ldm
  mesh = sharding_lib.make_mesh(config.mesh)
  built = ldm_stage.build(config, mesh, jax.random.key(0))
  holder = {"state": built["init"]()}
  zshape = networks.latent_shape(config)
  rng = np.random.default_rng(0)
  b = t.batch_size
  z = rng.standard_normal((b, *zshape)).astype(np.float32)
  cond = rng.random((b, len(config.data.covariates))).astype(np.float32)
  batch = {"latent_mean": sharding_lib.global_batch(z, mesh),
           "latent_logvar": sharding_lib.global_batch(np.zeros_like(z), mesh),
           "cond": sharding_lib.global_batch(cond, mesh)}
  scale = jax.device_put(np.float32(1.0), sharding_lib.replicated(mesh))
  compiled, flops, compile_s = compile_aot(built["step"], holder["state"], batch, None, scale)

  def ours():
    holder["state"], metrics = compiled(holder["state"], batch, None, scale)
    jax.block_until_ready(metrics)

  unet = load_into_monai(nets.DiffusionModelUNet(**monai_kwargs(config.unet)),
                         holder["state"].params, "unet").train()
  ema = [p.detach().clone() for p in unet.parameters()]
  opt = torch.optim.Adam(unet.parameters(), lr=t.learning_rate)
  d = config.diffusion
  sched = DDPMScheduler(num_train_timesteps=d.num_train_timesteps, schedule=d.schedule,
                        beta_start=d.beta_start, beta_end=d.beta_end)
  zt_, ct = torch_nchw(z), torch_tensor(cond)

  def theirs():
    steps = torch.randint(0, d.num_train_timesteps, (b,), device=bench_monai.TORCH_DEVICE)
    noise = torch.randn_like(zt_)
    noisy = sched.add_noise(zt_, noise, steps)
    loss = torch.nn.functional.mse_loss(torch_unet_call(unet, noisy, ct, steps).float(), noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
      params = list(unet.parameters())
      torch._foreach_mul_(ema, t.ema_decay)  # pylint: disable=protected-access
      torch._foreach_add_(ema, params, alpha=1 - t.ema_decay)  # pylint: disable=protected-access

  times = interleaved({"gemm": gemm_fn(), "ours": ours, "monai": theirs}, args.repeats)
  report.compare(name,
                 f"batch {b}, latent {'×'.join(map(str, zshape[:-1]))}", times, flops,
                 f"ε-MSE, Adam, EMA (both); {1 / times['ours']:.2f} vs "
                 f"{1 / times['monai']:.2f} steps/s; compile {compile_s:.0f} s")
  return compiled


def case_msssim(report, args, pairs: int = 8):
  shape = (40, 56, 40)
  weights = ssim.ms_ssim_weights_for(shape)
  rng = np.random.default_rng(0)
  x = rng.random((pairs, *shape, 1), np.float32)
  y = np.clip(x + 0.1 * rng.standard_normal(x.shape, np.float32), 0, 1)
  fn = jax.jit(functools.partial(ssim.ms_ssim, spatial_dims=3, weights=weights))
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  compiled, flops, _ = compile_aot(fn, xj, yj)
  metric = MultiScaleSSIMMetric(spatial_dims=3, weights=weights, reduction="none")
  tx, ty = torch_nchw(x), torch_nchw(y)

  def theirs():
    with torch.no_grad():
      return metric(tx, ty)

  diff = float(np.abs(np.asarray(compiled(xj, yj)) - theirs().numpy().reshape(-1)).max())
  times = interleaved({"gemm": gemm_fn(), "ours": lambda: compiled(xj, yj).block_until_ready(),
                       "monai": theirs}, args.repeats)
  report.compare("MS-SSIM 3D (demo volume)", f"{pairs} pairs, {'×'.join(map(str, shape))}, "
                 f"{len(weights)} scales", times, flops,
                 f"{pairs / times['ours']:.1f} vs {pairs / times['monai']:.1f} pairs/s; "
                 f"max |diff| {diff:.1e}")


def case_memory(report, args, variants=None):
  """`variants`: (backend, dtype, remat) triples; default those of the CPU table."""
  # auto: this CPU's convolutions (oneDNN); native: the convolution GPU/TPU compile (cuDNN / TPU
  # conv unit on those backends); bfloat16: the compute dtype the paper preset uses on accelerators.
  variants = variants or [("auto", "float32", True), ("native", "float32", True),
                          ("native", "bfloat16", True)]
  if args.memory_no_remat:
    variants.append(("native", "float32", False))
  for impl, dtype, remat in variants:
    config = presets.base_config("paper")
    config.autoencoder.remat = remat
    config.autoencoder.dtype = dtype
    config.train_ae.batch_size = 1
    mesh = sharding_lib.make_mesh(config.mesh)
    t0 = time.perf_counter()
    with ops.backend(impl):
      built = ae_stage.build(config, mesh, jax.random.key(0))
      image = jax.ShapeDtypeStruct((1, *config.data.shape, 1), jnp.float32,
                                   sharding=sharding_lib.batch_sharding(mesh))
      lowered = built["adversarial_step"].lower(built["abstract"], {"image": image})
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    gib = lambda n: n / 2**30
    temp, arg, out = m.temp_size_in_bytes, m.argument_size_in_bytes, m.output_size_in_bytes
    alias = getattr(m, "alias_size_in_bytes", 0)
    live = temp + arg + out - alias
    report.check(f"paper AE train step memory, batch 1, conv {impl}, {dtype}, remat={remat}",
                 f"{gib(live):.2f} GiB", "≤ 12 GiB", gib(live) <= 12,
                 f"compiled for XLA:{jax.default_backend().upper()}, not run (memory_analysis, "
                 f"compile {seconds:.0f} s):"
                 f" temp {gib(temp):.2f} + arguments {gib(arg):.2f} + outputs {gib(out):.2f} GiB"
                 f" − outputs aliasing donated arguments {gib(alias):.2f} GiB; XLA flops "
                 f"{xla_flops(compiled, lowered) / 1e12:.2f} T per step")
