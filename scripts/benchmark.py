r"""One benchmark of brain_ldm_jax against MONAI: same networks, same weights, same CPU and threads.

    python scripts/benchmark.py                    # everything (about 13 min on 2 cores)
    python scripts/benchmark.py --quick            # 2 repeats, paper UNet width / 4, no memory
    python scripts/benchmark.py --cases unet_demo,ddim --repeats 5
    python scripts/benchmark.py --threads 1        # both libraries on one core

Cases (`--cases`, comma-separated; default all):
  unet_demo    UNet forward, demo preset, at the demo latent shape (10×14×10).
  unet_paper   UNet forward at the paper's channels / `--paper_width_divisor` on a small latent
               (`--paper_latent`, default 12×16×12; 10×14×10 does not halve twice) and, unless
               --quick, on the paper's own latent, 20×28×20 (160×224×160 / 8).
  ddim         DDIM-50 sample + decode per volume, demo preset. Ours: `api.make_sampler` (one jitted
               program); MONAI: a Python loop over `DDIMScheduler.step` with the MONAI UNet, then
               `AutoencoderKL.decode_stage_2_outputs`, under `torch.no_grad`.
  ddim_paper   The same with the `unet_paper` UNet on the `--paper_latent` (the demo autoencoder
               decodes it): two rounds in mirrored order, no warm-up call (each side makes 2 × 50
               paper-width UNet calls; about 5 min at 12×16×12).
  dpmpp        DPM-Solver++(2M) at the smallest N in {10, 15, 20, 25} whose final latent is as close
               to DDIM-200's (same noise) as DDIM-50's is; timed like `ddim` (vs MONAI's DDIM-50,
               MONAI has no DPM-Solver++). With random weights this is a numerical-accuracy proxy.
  overhead     Sampler overhead on the `test` UNet (16³ latent): sampler time / (N × one jitted
               network call), and DDPM-1000 / DDIM-50 time.
  ae_step      Autoencoder train step, demo preset: our jitted step from train/autoencoder.build vs
               MONAI AutoencoderKL + PatchDiscriminator with Adam, L1 + KL + LSGAN
               (PatchAdversarialLoss), the discriminator updated on the same step.
  ldm_step     LDM train step, demo preset (its batch size, cached latents): train/ldm.build vs the MONAI
               UNet, DDPMScheduler.add_noise, ε-MSE, Adam and an EMA of the weights.
  msssim       3D MS-SSIM throughput at the demo volume size (2 scales fit): metrics.ssim vs
               MONAI MultiScaleSSIMMetric.
  memory       Compiled (not run) paper-size (160×224×160) autoencoder train step, batch 1,
               autoencoder.remat=True, with this CPU's convolutions (oneDNN) and with the native
               conv (what GPU/TPU run), float32 and bfloat16: XLA's memory analysis of the
               executable for XLA:CPU (under a minute of compiling); not in --quick.

Every timing is the median of `--repeats` after a warm-up call (compilation excluded); ours and
MONAI's calls alternate (round-robin, every other round reversed) together with a float32 GEMM,
so load from other jobs and drift hit all alike and each row's "% of peak" uses the GEMM timed in
the same rounds. Ours' GFLOP/s is XLA's `cost_analysis()` flop count of the compiled program over
its time; MONAI's column divides the same count by MONAI's time (same math, so comparable).
Weights are MONAI's initialisation converted with `nn/convert.py` (both ways); MONAI's
zero-initialised output convolutions get random values, so the networks compute non-trivial
functions.

Writes the table to benchmarks/benchmark.md (`--out`) and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import sys
import time

import numpy as np

import harness

ALL_CASES = ("unet_demo", "unet_paper", "ddim", "ddim_paper", "dpmpp", "overhead", "ae_step", "ldm_step",
             "msssim", "memory")
DPM_CANDIDATES = (10, 15, 20, 25)
PAPER_LATENT = (20, 28, 20)  # 160×224×160 over the paper autoencoder's ×8 downsampling
_EXTRA = ("remat", "dtype")

# Imported in main() once the thread count is set (XLA reads it when it starts).
jax = jnp = torch = None
# Where MONAI runs: "cpu" here; scripts/benchmark_gpu.py sets "cuda" for the same cases on a GPU.
TORCH_DEVICE = "cpu"


# ---------------------------------------------------------------------------------------------
# Timing, cost analysis


def interleaved(fns: dict, repeats: int, warmup: bool = True) -> harness.Timings:
  """`harness.interleaved`, waiting for MONAI's queued GPU work after each call."""
  return harness.interleaved(fns, repeats, warmup=warmup, sync=torch_sync)


def torch_sync():
  """Waits for MONAI's queued GPU work (a CUDA call returns before the kernels finish)."""
  if TORCH_DEVICE != "cpu":
    torch.cuda.synchronize()


GEMM_N = 2048


def gemm_fn():
  a = jax.random.normal(jax.random.key(0), (GEMM_N, GEMM_N), jnp.float32)
  mm = jax.jit(lambda a: a @ a).lower(a).compile()
  return lambda: mm(a).block_until_ready()


def gemm_gflops(seconds: float) -> float:
  return 2 * GEMM_N**3 / seconds / 1e9


def compile_aot(fn, *args):
  """(compiled executable, XLA flop count, seconds to compile) of a jitted fn for `args`."""
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  return compiled, xla_flops(compiled, lowered), seconds


def xla_flops(compiled, lowered) -> float:
  """XLA's cost-analysis flops of a program, convolutions included.

  XLA counts custom calls as zero: on CPU our oneDNN convolutions (added from the HLO), on GPU
  the cuDNN calls its compiler turns every convolution into, so there the count comes from the
  program before optimisation, where they are still convolution ops.
  """
  from brain_ldm_jax.cpu import onednn  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "cpu":
    return _flops(lowered.cost_analysis())
  return _flops(compiled.cost_analysis()) + onednn.hlo_flops(compiled.as_text())


def _flops(cost) -> float:
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def torch_nchw(x: np.ndarray):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))).to(TORCH_DEVICE)


def torch_tensor(x: np.ndarray):
  return torch.from_numpy(np.asarray(x)).to(TORCH_DEVICE)


# ---------------------------------------------------------------------------------------------
# The same network in MONAI and Flax


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


# ---------------------------------------------------------------------------------------------
# Result rows


class Report:
  def __init__(self):
    self.rows = []  # comparisons
    self.checks = []  # sampler checks and memory
    self.notes = []

  def compare(self, case, unit_item, times: harness.Timings, flops, note=""):
    """A row from `times` ("ours", "monai", "gemm"). Its note gets the range of the rounds'
    own ratios (ours / MONAI in the same round): how far the host's drift moved them."""
    ours_s, monai_s, gemm_s = times["ours"], times["monai"], times["gemm"]
    per_round = [o / m for o, m in zip(times.rounds["ours"], times.rounds["monai"]) if m]
    if len(per_round) > 1:
      spread = f"rounds' ratios {min(per_round):.2f}–{max(per_round):.2f}"
      note = f"{spread}; {note}" if note else spread
    peak = gemm_gflops(gemm_s)
    gf = flops / ours_s / 1e9 if np.isfinite(flops) else float("nan")
    gf_m = flops / monai_s / 1e9 if (np.isfinite(flops) and monai_s) else float("nan")
    self.rows.append(dict(case=case, item=unit_item, ours=ours_s, monai=monai_s, flops=flops,
                          gf=gf, gf_m=gf_m, peak=peak, note=note))
    ratio = f"{ours_s / monai_s:.2f}" if monai_s else "-"
    print(f"  -> {case}: ours {fmt_s(ours_s)}, MONAI {fmt_s(monai_s)}, ratio {ratio}, "
          f"{gf:.0f} GFLOP/s ({100 * gf / peak:.0f}% of {peak:.0f}) {note}", flush=True)

  def check(self, name, value, target="", ok=None, note=""):
    self.checks.append(dict(name=name, value=value, target=target, ok=ok, note=note))
    print(f"  -> {name}: {value} {target} {'' if ok is None else ('PASS' if ok else 'MISS')} "
          f"{note}", flush=True)


def fmt_s(s):
  if s is None:
    return "-"
  return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


# ---------------------------------------------------------------------------------------------
# Cases


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
  autocast = torch.autocast(TORCH_DEVICE.split(":")[0], dtype=torch.bfloat16,
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


def demo_run(config, ae_variables, unet_variables):
  from brain_ldm_jax import api  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax.data import manifest  # pylint: disable=g-import-not-at-top
  names = tuple(config.data.covariates)
  stats = manifest.CovariateStats(names, (0.0,) * len(names), (1.0,) * len(names))
  return api.Run(config=config, params={"autoencoder": ae_variables["params"],
                                        "unet": unet_variables["params"]},
                 stats=stats, scale_factor=1.0, affine=np.eye(4), checkpoint="random weights")


def unet_call_flops(config, params, batch=1):
  """XLA flops of one sampler step's network call (hybrid conditioning + UNet), batch 1."""
  from brain_ldm_jax.nn import unet as unet_lib  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax import networks  # pylint: disable=g-import-not-at-top
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
    from monai.networks.schedulers import DDIMScheduler  # pylint: disable=g-import-not-at-top

    from brain_ldm_jax import networks  # pylint: disable=g-import-not-at-top
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
    from brain_ldm_jax import api  # pylint: disable=g-import-not-at-top
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
      with torch.no_grad():
        sched.set_timesteps(steps)
        z = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(TORCH_DEVICE)
        for t in sched.timesteps:
          eps = torch_unet_call(unet, z, cond, torch.full((1,), int(t), dtype=torch.long,
                                                          device=TORCH_DEVICE))
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


def paper_unet(args):
  """(section, name, latent spatial shape) of the `unet_paper` and `ddim_paper` cases."""
  from brain_ldm_jax import presets  # pylint: disable=g-import-not-at-top
  section = presets.base_config("paper").unet
  div = args.paper_width_divisor
  section.channels = tuple(c // div for c in section.channels)
  section.num_head_channels = tuple(c // div for c in section.num_head_channels)
  spatial = tuple(int(s) for s in args.paper_latent.split(","))
  return section, f"UNet paper width/{div}" if div > 1 else "UNet paper width", spatial


def case_ddim_paper(report, args):
  from brain_ldm_jax import presets  # pylint: disable=g-import-not-at-top
  section, name, spatial = paper_unet(args)
  config = presets.base_config("demo")
  config.unet = section
  factor = 2 ** (len(config.autoencoder.channels) - 1)
  config.data.shape = tuple(factor * s for s in spatial)
  case_ddim(report, args, DemoSampling(config),
            f"DDIM-50 sample + decode ({name}, {'×'.join(map(str, spatial))} latent)",
            repeats=2, warmup=False,
            note="two rounds (ours, MONAI, MONAI, ours), no warm-up; the demo autoencoder "
                 "decodes; ")


def dpm_quality_match(demo: DemoSampling, num_samples: int = 2):
  """{sampler-N: rel. L2 error of the final latent vs DDIM-200}, and the chosen DPM++ N."""
  from brain_ldm_jax import api  # pylint: disable=g-import-not-at-top
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
  from brain_ldm_jax import api  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax import presets  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax import networks  # pylint: disable=g-import-not-at-top
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


def case_ae_step(report, args, config=None, name="autoencoder train step (demo)"):
  """`config`: default the demo preset. Its autoencoder.remat is MONAI's use_checkpoint."""
  from monai.losses import PatchAdversarialLoss  # pylint: disable=g-import-not-at-top
  from monai.networks import nets  # pylint: disable=g-import-not-at-top

  from brain_ldm_jax import presets  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax.train import autoencoder as ae_stage  # pylint: disable=g-import-not-at-top
  config = config or presets.base_config("demo")
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
  from monai.networks import nets  # pylint: disable=g-import-not-at-top
  from monai.networks.schedulers import DDPMScheduler  # pylint: disable=g-import-not-at-top

  from brain_ldm_jax import presets  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax import networks  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax.train import ldm as ldm_stage  # pylint: disable=g-import-not-at-top
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
    steps = torch.randint(0, d.num_train_timesteps, (b,), device=TORCH_DEVICE)
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
  from monai.metrics import MultiScaleSSIMMetric  # pylint: disable=g-import-not-at-top

  from brain_ldm_jax.metrics import ssim as S  # pylint: disable=g-import-not-at-top
  shape = (40, 56, 40)
  weights = S.ms_ssim_weights_for(shape)
  rng = np.random.default_rng(0)
  x = rng.random((pairs, *shape, 1), np.float32)
  y = np.clip(x + 0.1 * rng.standard_normal(x.shape, np.float32), 0, 1)
  fn = jax.jit(functools.partial(S.ms_ssim, spatial_dims=3, weights=weights))
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
  from brain_ldm_jax import presets  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax.nn import ops  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax.train import autoencoder as ae_stage  # pylint: disable=g-import-not-at-top
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


# ---------------------------------------------------------------------------------------------
# Output


def machine_info(threads) -> list[str]:
  import monai  # pylint: disable=g-import-not-at-top
  model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
  flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
  isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in flags)
  return [
      f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
      f"- CPU: {model} ({isa}); {os.cpu_count()} logical CPUs, this process pinned to "
      f"{len(os.sched_getaffinity(0))}",
      f"- threads: XLA intra-op pool = {len(os.sched_getaffinity(0))} schedulable CPUs "
      f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or 'unset'}), "
      f"torch.get_num_threads() = {torch.get_num_threads()} (set to {threads})",
      f"- malloc (both libraries): {_allocator()}",
      f"- jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
      f"monai {monai.__version__}, numpy {np.__version__}, Python {platform.python_version()}",
      f"- command: `python {' '.join(sys.argv)}`",
  ]


def _allocator() -> str:
  from brain_ldm_jax.cpu import host  # pylint: disable=g-import-not-at-top
  if host.keep_freed_memory():
    return "freed memory kept in the process (`cpu.host.keep_freed_memory`)"
  return f"glibc's defaults ({host.OPT_OUT_ENV}=system, or not glibc)"


COMPARISON_COLUMNS = [("case", "l"), ("item", "l"), ("ours", "r"), ("MONAI", "r"),
                      ("ours/MONAI", "r"), ("ours GFLOP/s (% peak)", "r"), ("MONAI GFLOP/s", "r"),
                      ("notes", "l")]
CHECK_COLUMNS = [("check", "l"), ("value", "r"), ("target", "l"), ("", "l"), ("notes", "l")]


def _comparison_cells(r: dict) -> list[str]:
  ratio = f"{r['ours'] / r['monai']:.2f}" if r["monai"] else "-"
  gf = f"{r['gf']:.0f} ({100 * r['gf'] / r['peak']:.0f}%)" if np.isfinite(r["gf"]) else "-"
  gfm = f"{r['gf_m']:.0f}" if np.isfinite(r["gf_m"]) else "-"
  return [r["case"], r["item"], fmt_s(r["ours"]), fmt_s(r["monai"]), ratio, gf, gfm, r["note"]]


def markdown(report: Report, info: list[str], args, wall_s: float) -> str:
  lines = ["# brain_ldm_jax vs MONAI on this machine", "", *info,
           f"- median of {args.repeats} after a warm-up; ours and MONAI alternate with a "
           f"{GEMM_N}² float32 jax GEMM in every round, every other round in reverse order; "
           f"total wall time {wall_s / 60:.1f} min", ""]
  if report.rows:
    peaks = [r["peak"] for r in report.rows]
    lines += [f"GEMM peak measured alongside: {min(peaks):.0f}–{max(peaks):.0f} GFLOP/s "
              f"({GEMM_N}² float32 matmul in jax, default precision).", ""]
    lines += harness.markdown_table(COMPARISON_COLUMNS, [_comparison_cells(r) for r in report.rows])
    lines.append("")
  if report.checks:
    rows = [[c["name"], c["value"], c["target"],
             "" if c["ok"] is None else ("pass" if c["ok"] else "**miss**"), c["note"]]
            for c in report.checks]
    lines += harness.markdown_table(CHECK_COLUMNS, rows)
    lines.append("")
  lines += ["Notes:", "",
            "- ratio < 1: ours is faster. GFLOP/s = XLA cost-analysis flops of the compiled "
            "program / median time; the MONAI column divides the same count by MONAI's time.",
            "- rounds' ratios: the lowest and highest of ours / MONAI within one round (the two "
            "run back to back); their spread is how far the host's drift moved the ratio during "
            "the run.",
            "- Weights: MONAI's initialisation (zero-initialised convolutions given random values) "
            "converted with nn/convert.py; timings do not depend on the values."]
  lines += [f"- {n}" for n in report.notes]
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[1:]))
  parser.add_argument("--cases", default=None, help="default: all (--quick: all but memory)")
  parser.add_argument("--quick", action="store_true",
                      help="2 repeats and the paper UNet at width / 4")
  parser.add_argument("--repeats", type=int, default=0, help="default 5 (2 with --quick)")
  parser.add_argument("--threads", type=int, default=0, help="both libraries (0: all CPUs)")
  parser.add_argument("--paper_width_divisor", type=int, default=0,
                      help="paper UNet channels / this (default 1, 4 with --quick)")
  parser.add_argument("--paper_latent", default="12,16,12",
                      help="divisible by 4 (three UNet levels)")
  parser.add_argument("--memory_no_remat", action="store_true",
                      help="also compile the paper AE step without remat, for comparison")
  parser.add_argument("--dpm_steps", type=int, default=0,
                      help="skip the DPM++ quality search and use these steps")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "benchmarks", "benchmark.md"))
  args = parser.parse_args()
  args.repeats = args.repeats or (2 if args.quick else 5)
  args.paper_width_divisor = args.paper_width_divisor or (4 if args.quick else 1)
  if args.cases is None:  # --quick leaves out the paper-size compile (> 6 min on 2 cores)
    args.cases = ",".join(c for c in ALL_CASES if not (args.quick and c == "memory"))
  cases = [c.strip() for c in args.cases.split(",") if c.strip()]
  unknown = sorted(set(cases) - set(ALL_CASES))
  if unknown:
    parser.error(f"unknown cases {unknown}; choose from {', '.join(ALL_CASES)}")

  threads = harness.set_threads(args.threads)
  global jax, jnp, torch
  import jax  # pylint: disable=g-import-not-at-top,redefined-outer-name
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,redefined-outer-name
  import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name
  torch.set_num_threads(threads)
  from brain_ldm_jax import presets  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax.nn import ops  # pylint: disable=g-import-not-at-top
  ops.set_backend()  # its allocator setting serves MONAI's calls too: one process, one allocator

  start = time.perf_counter()
  info = machine_info(threads)
  print("\n".join(info), flush=True)
  report = Report()
  demo_cfg = presets.base_config("demo")
  demo_sampling = None
  dpm_steps = args.dpm_steps or None

  def log(name):
    print(f"[{time.perf_counter() - start:6.0f} s] {name}", flush=True)

  def run_case(case):
    nonlocal demo_sampling, dpm_steps
    if case == "unet_demo":
      from brain_ldm_jax import networks  # pylint: disable=g-import-not-at-top
      case_unet(report, args, "UNet demo", demo_cfg.unet, networks.latent_shape(demo_cfg)[:-1])
    elif case == "unet_paper":
      section, name, spatial = paper_unet(args)
      case_unet(report, args, name, section, spatial)
      if not args.quick and spatial != PAPER_LATENT:
        case_unet(report, args, name, section, PAPER_LATENT)
    elif case == "ddim_paper":
      case_ddim_paper(report, args)
    elif case in ("ddim", "dpmpp"):
      demo_sampling = demo_sampling or DemoSampling(demo_cfg)
      if case == "ddim":
        case_ddim(report, args, demo_sampling)
      else:
        dpm_steps = case_dpmpp(report, args, demo_sampling)
    elif case == "overhead":
      case_overhead(report, args, dpm_steps or 20)
    elif case == "ae_step":
      case_ae_step(report, args)
    elif case == "ldm_step":
      case_ldm_step(report, args)
    elif case == "msssim":
      case_msssim(report, args)
    elif case == "memory":
      case_memory(report, args)

  def write():  # after every case, so an interrupted run still leaves its table
    text = markdown(report, info, args, time.perf_counter() - start)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text)
    return text

  for case in cases:
    log(case)
    try:
      run_case(case)
    except Exception as e:  # pylint: disable=broad-except
      import traceback  # pylint: disable=g-import-not-at-top
      traceback.print_exc()
      report.notes.append(f"case {case} failed: {type(e).__name__}: {str(e)[:300]}")
    write()
  log("done")
  print("\n" + write())
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
