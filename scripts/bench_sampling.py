"""scripts/benchmark.py's sampling cases: DDIM and DPM++ per volume, and the samplers' overhead.

Imports jax and torch: scripts/benchmark.py imports this module once the thread count is set.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
from monai.networks.schedulers import DDIMScheduler
import numpy as np
import torch

from bench_cases import paper_unet
import bench_monai
from bench_monai import monai_and_flax, torch_tensor, torch_unet_call
from bench_report import fmt_s
from bench_timing import compile_aot, gemm_fn, interleaved
from brain_ldm_jax import api
from brain_ldm_jax import networks
from brain_ldm_jax import presets
from brain_ldm_jax.data import manifest
from brain_ldm_jax.nn import unet as unet_lib

DPM_CANDIDATES = (10, 15, 20, 25)


def demo_run(config, ae_variables, unet_variables):
  names = tuple(config.data.covariates)
  stats = manifest.CovariateStats(names, (0.0,) * len(names), (1.0,) * len(names))
  return api.Run(config=config, params={"autoencoder": ae_variables["params"],
                                        "unet": unet_variables["params"]},
                 stats=stats, scale_factor=1.0, affine=np.eye(4), checkpoint="random weights")


def unet_call_flops(config, params, batch=1):
  """XLA flops of one sampler step's network call (hybrid conditioning + UNet), batch 1."""
  model = unet_lib.build_unet(config.unet)
  z = jnp.zeros((batch,) + networks.latent_shape(config))
  cond = jnp.zeros((batch, len(config.data.covariates)))

  def call(params, z, t, cond):
    x, context = unet_lib.hybrid_conditioning(z, cond)
    return model.apply({"params": params}, x, jnp.full((batch,), t), context=context)

  return compile_aot(jax.jit(call), params, z, jnp.int32(500), cond)


class DemoSampling:
  """Demo networks (MONAI init, converted) and both sampling paths, shared by `ddim`, `dpmpp`."""

  def __init__(self, config):
    self.config = config
    self.unet_ref, _, self.unet_vars = monai_and_flax("unet", config.unet, seed=1)
    self.ae_ref, _, self.ae_vars = monai_and_flax("autoencoder", config.autoencoder, seed=2)
    self.run = demo_run(config, self.ae_vars, self.unet_vars)
    self.zshape = networks.latent_shape(config)
    d = config.diffusion
    self.scheduler = DDIMScheduler(num_train_timesteps=d.num_train_timesteps, schedule=d.schedule,
                                   beta_start=d.beta_start, beta_end=d.beta_end,
                                   clip_sample=d.clip_sample, prediction_type=d.prediction_type)
    self.cond = np.full((1, len(config.data.covariates)), 0.5, np.float32)
    self.call_flops = unet_call_flops(config, self.run.params["unet"])[1]
    self.ours_ddim = self.ours_images("ddim", 50)
    self.monai_ddim = self.monai_images(50)

  def ours_images(self, sampler, steps):
    """(call, flops, compile seconds): one volume through api.make_sampler's jitted program.

    XLA's cost analysis counts a `lax.scan` body once (checked: a 10-step scan of a matmul
    reports one matmul's flops), so the other N − 1 network calls are added.
    """
    fn = api.make_sampler(self.run, sampler=sampler, num_steps=steps, eta=0.0,
                          guidance_scale=1.0).normalised
    args = (self.run.params, jax.random.key(0), jnp.asarray(self.cond),
            jnp.zeros((1,), jnp.int32))
    compiled, flops, compile_s = compile_aot(fn, *args)
    flops += (steps - 1) * self.call_flops
    return (lambda: compiled(*args).block_until_ready()), flops, compile_s

  def monai_images(self, steps):
    unet, ae, sched = self.unet_ref, self.ae_ref, self.scheduler
    cond = torch_tensor(self.cond)
    shape = (1, self.zshape[-1], *self.zshape[:-1])

    def call():
      device = bench_monai.TORCH_DEVICE
      with torch.no_grad():
        sched.set_timesteps(steps)
        z = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
        for t in sched.timesteps:
          eps = torch_unet_call(unet, z, cond, torch.full((1,), int(t), dtype=torch.long,
                                                          device=device))
          z, _ = sched.step(eps, int(t), z)
        img = ae.decode_stage_2_outputs(z / self.run.scale_factor)
        return torch.clamp(img, 0, 1)

    return call


def case_ddim(report, args, demo: DemoSampling, name="DDIM-50 sample + decode (demo)",
              repeats=None, warmup=True, note=""):
  ours, flops, compile_s = demo.ours_ddim
  times = interleaved({"gemm": gemm_fn(), "ours": ours, "monai": demo.monai_ddim},
                      repeats or args.repeats, warmup)
  report.compare(name, "per volume (batch 1)", times, flops,
                 f"{note}ours: api.make_sampler jitted (leading timesteps); flops = XLA's count + "
                 f"49 × one UNet call (XLA counts a scan body once); MONAI: Python loop over "
                 f"DDIMScheduler.step (linspace); compile {compile_s:.0f} s")


def case_ddim_paper(report, args):
  section, name, spatial = paper_unet(args)
  config = presets.base_config("demo")
  config.unet = section
  # The section's input and output sizes follow the paper's 3 latent channels: the demo
  # autoencoder's decide them here.
  sizes = presets.network_sizes(config.data.covariates, config.autoencoder.latent_channels)
  for field, size in sizes.items():
    config.unet[field.split(".")[1]] = size
  factor = 2 ** (len(config.autoencoder.channels) - 1)
  config.data.shape = tuple(factor * s for s in spatial)
  case_ddim(report, args, DemoSampling(config),
            f"DDIM-50 sample + decode ({name}, {'×'.join(map(str, spatial))} latent)",
            repeats=2, warmup=False,
            note="two rounds (ours, MONAI, MONAI, ours), no warm-up; the demo autoencoder "
                 "decodes; ")


def dpm_quality_match(demo: DemoSampling, num_samples: int = 2):
  """{sampler-N: rel. L2 error of the final latent vs DDIM-200}, and the chosen DPM++ N."""
  config = demo.config
  keys = api.sample_keys(jax.random.key(7), jnp.arange(num_samples, dtype=jnp.int32))
  cond = jnp.asarray(np.random.default_rng(3).random((num_samples, len(config.data.covariates))),
                     jnp.float32)
  params = demo.run.params["unet"]

  def final(sampler, steps):
    fn = api.sample_latents_fn(config, scale_factor=1.0, sampler=sampler, num_steps=steps,
                               eta=0.0, guidance_scale=1.0)
    return np.asarray(jax.jit(fn)(params, keys, cond), np.float64)

  ref = final("ddim", 200)
  err = lambda z: float(np.linalg.norm(z - ref) / np.linalg.norm(ref))
  errors = {"ddim-50": err(final("ddim", 50))}
  chosen = None
  for n in DPM_CANDIDATES:
    errors[f"dpmpp_2m-{n}"] = err(final("dpmpp_2m", n))
    if errors[f"dpmpp_2m-{n}"] <= errors["ddim-50"]:
      chosen = n
      break
  return errors, chosen


def case_dpmpp(report, args, demo: DemoSampling):
  if args.dpm_steps:
    return _time_dpmpp(report, args, demo, args.dpm_steps, "given with --dpm_steps")
  t0 = time.perf_counter()
  errors, chosen = dpm_quality_match(demo)
  listing = ", ".join(f"{k}: {v:.2e}" for k, v in errors.items())
  report.check("DPM++(2M) steps matching DDIM-50 (demo UNet, random weights)",
               f"N = {chosen}" if chosen else f"none of {DPM_CANDIDATES}",
               "N ≤ 25", chosen is not None,
               f"rel. L2 error of the final latent vs DDIM-200, same noise: {listing} "
               f"({time.perf_counter() - t0:.0f} s). Random weights: a numerical-accuracy proxy, "
               "not image quality.")
  return _time_dpmpp(report, args, demo, chosen or DPM_CANDIDATES[-1],
                     "same accuracy as DDIM-50 (see the checks)" if chosen else
                     "no candidate matched DDIM-50's accuracy")


def _time_dpmpp(report, args, demo, n, why):
  ours, flops, compile_s = demo.ours_images("dpmpp_2m", n)
  times = interleaved({"gemm": gemm_fn(), "ours": ours, "monai": demo.monai_ddim}, args.repeats)
  report.compare(f"DPM++(2M)-{n} sample + decode vs MONAI DDIM-50 (demo)", "per volume (batch 1)",
                 times, flops,
                 f"{why}; compile {compile_s:.0f} s")
  return n


def case_overhead(report, args, dpm_steps):
  """Sampler time over N × one jitted network call, on the tiny `test` UNet."""
  config = presets.base_config("test")
  _, _, variables = monai_and_flax("unet", config.unet, seed=4)
  params = variables["params"]
  zshape = networks.latent_shape(config)
  keys = api.sample_keys(jax.random.key(0), jnp.zeros((1,), jnp.int32))
  cond = jnp.full((1, len(config.data.covariates)), 0.5, jnp.float32)
  z = jax.random.normal(jax.random.key(1), (1,) + zshape)

  call, call_flops, _ = unet_call_flops(config, params)  # what every sampler step calls
  fns = {"call": lambda: call(params, z, jnp.int32(500), cond).block_until_ready()}
  steps = {"ddim": 50, "dpmpp_2m": dpm_steps, "ddpm": 1000}
  flops = {}
  for sampler, n in steps.items():
    fn = jax.jit(api.sample_latents_fn(config, 1.0, sampler=sampler, num_steps=n, eta=0.0,
                                       guidance_scale=1.0))
    compiled, flops[sampler], _ = compile_aot(fn, params, keys, cond)
    fns[sampler] = functools.partial(lambda c: c(params, keys, cond).block_until_ready(), compiled)
  # One network call is short: time 20 of them per round so timer noise does not matter.
  single = fns["call"]
  fns["call"] = lambda: [single() for _ in range(20)]
  times = interleaved(fns, max(2, args.repeats))
  t_call = times["call"] / 20
  for sampler, n in steps.items():
    ratio = times[sampler] / (n * t_call)
    report.check(f"sampler overhead {sampler}-{n} (test UNet, 16³ latent)",
                 f"{ratio:.3f}", "≤ 1.03", ratio <= 1.03,
                 f"{fmt_s(times[sampler])} / ({n} × {t_call * 1e3:.2f} ms per jitted call); "
                 f"XLA flops of the scan program {flops[sampler] / 1e9:.3f} G vs one call "
                 f"{call_flops / 1e9:.3f} G (the scan body is counted once)")
  ratio = times["ddpm"] / times["ddim"]
  report.check("DDPM-1000 / DDIM-50 time (test UNet)", f"{ratio:.1f}", "≥ 19", ratio >= 19)
