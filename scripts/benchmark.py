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
import os
import time

import harness

ALL_CASES = ("unet_demo", "unet_paper", "ddim", "ddim_paper", "dpmpp", "overhead", "ae_step", "ldm_step",
             "msssim", "memory")
PAPER_LATENT = (20, 28, 20)  # 160×224×160 over the paper autoencoder's ×8 downsampling


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
  # Only now: the cases' modules import jax and torch, which read the thread count when they start.
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  import bench_cases  # pylint: disable=g-import-not-at-top
  import bench_report  # pylint: disable=g-import-not-at-top
  import bench_sampling  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax import presets  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax.nn import ops  # pylint: disable=g-import-not-at-top
  ops.set_backend()  # its allocator setting serves MONAI's calls too: one process, one allocator

  start = time.perf_counter()
  info = bench_report.machine_info(threads)
  print("\n".join(info), flush=True)
  report = bench_report.Report()
  demo_cfg = presets.base_config("demo")
  demo_sampling = None
  dpm_steps = args.dpm_steps or None

  def log(name):
    print(f"[{time.perf_counter() - start:6.0f} s] {name}", flush=True)

  def run_case(case):
    nonlocal demo_sampling, dpm_steps
    if case == "unet_demo":
      from brain_ldm_jax import networks  # pylint: disable=g-import-not-at-top
      bench_cases.case_unet(report, args, "UNet demo", demo_cfg.unet,
                            networks.latent_shape(demo_cfg)[:-1])
    elif case == "unet_paper":
      section, name, spatial = bench_cases.paper_unet(args)
      bench_cases.case_unet(report, args, name, section, spatial)
      if not args.quick and spatial != PAPER_LATENT:
        bench_cases.case_unet(report, args, name, section, PAPER_LATENT)
    elif case == "ddim_paper":
      bench_sampling.case_ddim_paper(report, args)
    elif case in ("ddim", "dpmpp"):
      demo_sampling = demo_sampling or bench_sampling.DemoSampling(demo_cfg)
      if case == "ddim":
        bench_sampling.case_ddim(report, args, demo_sampling)
      else:
        dpm_steps = bench_sampling.case_dpmpp(report, args, demo_sampling)
    elif case == "overhead":
      bench_sampling.case_overhead(report, args, dpm_steps or 20)
    elif case == "ae_step":
      bench_cases.case_ae_step(report, args)
    elif case == "ldm_step":
      bench_cases.case_ldm_step(report, args)
    elif case == "msssim":
      bench_cases.case_msssim(report, args)
    elif case == "memory":
      bench_cases.case_memory(report, args)

  def write():  # after every case, so an interrupted run still leaves its table
    text = bench_report.markdown(report, info, args, time.perf_counter() - start)
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
