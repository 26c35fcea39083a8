r"""brain_ldm_jax vs MONAI at the paper's size on one GPU: same networks, same weights, one process.

    python scripts/benchmark_gpu.py                  # all cases (about 5 min on one H100)
    python scripts/benchmark_gpu.py --cases unet,ddim --repeats 20
    python scripts/benchmark_gpu.py --smoke          # 1/8 width at 32³ on any backend: checks the script
    python scripts/benchmark_gpu.py --count_flops    # the cases' flops, on the CPU, in seconds

The GPU companion of scripts/benchmark.py, whose case functions it runs with PyTorch on CUDA and
the paper preset instead of the demo one. Cases (`--cases`, comma-separated; default all):
  ae_step   paper autoencoder + discriminator adversarial step, 160×224×160, batch 1,
            autoencoder.remat (ours) / use_checkpoint (MONAI), float32; and each side's peak device
            memory over the step (JAX's allocator statistics; torch.cuda.max_memory_allocated).
            With JAX's allocator growing on demand, both steps in one process need more than an
            80 GB H100 holds; there, give JAX one block from the start:
            XLA_PYTHON_CLIENT_PREALLOCATE=true XLA_PYTHON_CLIENT_MEM_FRACTION=.45 (ran on an
            H100, benchmarks/benchmark_gpu.md).
  memory    the same step with the bfloat16 compute dtype, compiled for this GPU: XLA's memory
            analysis. (The allocator's peak is cumulative, so only the first case can read it.)
  unet      paper UNet forward at the paper latent 20×28×20, batch 1, float32 and bfloat16 (MONAI
            under torch.autocast(bfloat16)).
  ddim      DDIM-50 + paper autoencoder decode to 160×224×160, per volume (batch 1).
  ldm_step  paper LDM train step at 20×28×20, batch `--ldm_batch`, no activation remat on either
            side (MONAI's UNet has none).
Every compiled program is also checked for its convolutions: on GPU `conv`'s `auto` must leave them
to cuDNN (XLA's `__cudnn$conv*` custom calls) and call none of the CPU lowerings.

Precision: JAX's default float32 precision on NVIDIA GPUs from Ampere on runs convolutions and
matmuls in TF32; PyTorch's default runs cuDNN convolutions in TF32 but matmuls in float32. So that
both do the same arithmetic, this script sets torch.backends.cuda.matmul.allow_tf32 = True;
`--highest` makes both full float32 (jax_default_matmul_precision="highest", TF32 off in torch).

Timing is scripts/benchmark.py's: medians of `--repeats` alternating rounds after a warm-up, with
a GEMM (`--gemm_n`² float32 at the default precision) timed in the same rounds as the peak; MONAI's
calls are followed by torch.cuda.synchronize(). Writes benchmarks/benchmark_gpu.md (`--out`).

XLA:GPU's cost analysis counts none of the work it hands to cuDNN and cuBLAS (nearly all of it),
and (jax 0.11.2) gives no count for the unoptimised program. So the GFLOP/s columns use
`--count_flops`, run first in a CPU-only subprocess: the same programs lowered, not compiled, for
XLA:CPU with the native convolution the GPU runs, whose cost analysis counts them whole.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# JAX takes 75 % of the GPU when it starts unless told otherwise; MONAI needs room beside it, and
# the peak-memory row needs JAX's allocator to grow on demand.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ALL_CASES = ("ae_step", "unet", "ddim", "ldm_step", "memory")
_ONEDNN = "brain_ldm_jax_"  # our CPU custom calls' target prefix
_CUDNN_CONV = "__cudnn$conv"

jax = jnp = torch = None


def paper_config(smoke: bool):
  """The paper preset; with `smoke`, its networks at 1/8 width on 32³ volumes (same structure)."""
  from brain_ldm_jax import presets  # pylint: disable=g-import-not-at-top
  config = presets.base_config("paper")
  if smoke:
    config.data.shape = (32, 32, 32)
    config.autoencoder.channels = tuple(c // 8 for c in config.autoencoder.channels)
    config.autoencoder.norm_num_groups = 8
    config.discriminator.channels //= 8
    config.unet.channels = tuple(c // 8 for c in config.unet.channels)
    config.unet.num_head_channels = tuple(c // 8 for c in config.unet.num_head_channels)
  return config


def conv_check(report, name, compiled):
  """Which convolutions a compiled program runs: cuDNN's on GPU, never our CPU custom calls."""
  text = compiled.as_text()
  cudnn, ours = text.count(f'custom_call_target="{_CUDNN_CONV}'), text.count(_ONEDNN)
  on_gpu = jax.default_backend() == "gpu"
  report.check(f"convolutions in {name}", f"{cudnn} cuDNN, {ours} CPU custom calls",
               "cuDNN only" if on_gpu else "", (cudnn > 0 and ours == 0) if on_gpu else None,
               f"backend {jax.default_backend()}")


def gib(n):
  return f"{n / 2**30:.2f} GiB"


def case_ae_step(report, args):
  import bench_cases  # pylint: disable=g-import-not-at-top
  import bench_monai  # pylint: disable=g-import-not-at-top
  config = paper_config(args.smoke)
  config.train_ae.batch_size = 1
  shape = "×".join(map(str, config.data.shape))
  if bench_monai.TORCH_DEVICE != "cpu":
    torch.cuda.reset_peak_memory_stats()
  compiled = bench_cases.case_ae_step(report, args, config,
                                      f"autoencoder train step (paper, {shape}, remat)")
  conv_check(report, "the autoencoder train step", compiled)
  stats = jax.local_devices()[0].memory_stats() or {}
  m = compiled.memory_analysis()
  xla = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - getattr(
      m, "alias_size_in_bytes", 0)
  if "peak_bytes_in_use" in stats and bench_monai.TORCH_DEVICE != "cpu":
    peak, peak_monai = stats["peak_bytes_in_use"], torch.cuda.max_memory_allocated()
    report.check(f"paper AE train step peak device memory, batch 1, float32, remat ({shape})",
                 f"{gib(peak)} (MONAI {gib(peak_monai)})", "≤ 12 GiB", peak <= 12 * 2**30,
                 f"JAX allocator's peak since the process started (this case runs first): "
                 f"state, batch and the step; XLA's memory analysis of the step {gib(xla)}. "
                 f"MONAI: torch.cuda.max_memory_allocated over its steps, use_checkpoint=True")
  if bench_monai.TORCH_DEVICE != "cpu":
    torch.cuda.empty_cache()


def case_unet(report, args):
  import bench_cases  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax import networks  # pylint: disable=g-import-not-at-top
  config = paper_config(args.smoke)
  spatial = networks.latent_shape(config)[:-1]
  for dtype in ("float32", "bfloat16"):
    section = config.unet.copy_and_resolve_references()
    section.dtype = dtype
    compiled = bench_cases.case_unet(report, args, f"UNet paper ({dtype})", section, spatial)
    if dtype == "float32":
      conv_check(report, "the paper UNet forward", compiled)


def case_ddim(report, args):
  import bench_sampling  # pylint: disable=g-import-not-at-top
  config = paper_config(args.smoke)
  shape = "×".join(map(str, config.data.shape))
  bench_sampling.case_ddim(report, args, bench_sampling.DemoSampling(config),
                           f"DDIM-50 sample + decode (paper, {shape})")


def case_ldm_step(report, args):
  import bench_cases  # pylint: disable=g-import-not-at-top
  config = paper_config(args.smoke)
  config.unet.remat = False
  config.train_ldm.batch_size = args.ldm_batch
  compiled = bench_cases.case_ldm_step(report, args, config, "LDM train step (paper UNet)")
  conv_check(report, "the LDM train step", compiled)


def count_flops(args) -> dict[str, float]:
  """Flops per item of the timed programs, by case, from XLA:CPU's cost analysis of them lowered
  with the native convolution (what `auto` picks on GPU); nothing is compiled or run."""
  from brain_ldm_jax import networks  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax import nn as bnn  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax.nn import ops  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax.nn import unet as unet_lib  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax.train import autoencoder as ae_stage  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax.train import ldm as ldm_stage  # pylint: disable=g-import-not-at-top
  ops.set_backend("native")  # this process only counts
  config = paper_config(args.smoke)
  flops = lambda lowered: float(lowered.cost_analysis()["flops"])
  spec = lambda shape, sharding=None: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
  zshape, n_cov = networks.latent_shape(config), len(config.data.covariates)
  unet = unet_lib.build_unet(config.unet)
  ae = bnn.build_autoencoder(config.autoencoder)
  x_unet = (1, *zshape[:-1], config.unet.in_channels)
  unet_vars = jax.eval_shape(lambda: unet.init(jax.random.key(0), jnp.zeros(x_unet),
                                               jnp.zeros((1,), jnp.int32),
                                               context=jnp.zeros((1, 1, n_cov))))
  ae_vars = jax.eval_shape(lambda: ae.init(jax.random.key(0), jnp.zeros((1, 8, 8, 8, 1)),
                                           jax.random.key(1)))
  forward = flops(jax.jit(lambda v, x, t, c: unet.apply(v, x, t, context=c)).lower(
      unet_vars, spec(x_unet), jax.ShapeDtypeStruct((1,), jnp.int32), spec((1, 1, n_cov))))
  decode = flops(jax.jit(lambda v, z: ae.apply(v, z, method="decode")).lower(
      ae_vars, spec((1, *zshape))))
  mesh = sharding_lib.make_mesh(config.mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  config.train_ae.batch_size = 1
  built = ae_stage.build(config, mesh, jax.random.key(0))
  ae_step = flops(built["adversarial_step"].lower(
      built["abstract"], {"image": spec((1, *config.data.shape, 1), batch_sharding)}))
  config.unet.remat, b = False, args.ldm_batch
  built = ldm_stage.build(config, mesh, jax.random.key(0))
  latents = spec((b, *zshape), batch_sharding)
  ldm_step = flops(built["step"].lower(
      built["abstract"], {"latent_mean": latents, "latent_logvar": latents,
                          "cond": spec((b, n_cov), batch_sharding)},
      None, spec((), sharding_lib.replicated(mesh))))
  return {"ae_step": ae_step, "unet": forward, "ddim": 50 * forward + decode, "ldm_step": ldm_step}


def counted_flops(args) -> dict[str, float]:
  """`count_flops` in a CPU-only process (this one holds the GPU backend); {} if it fails."""
  command = [sys.executable, os.path.abspath(__file__), "--count_flops", "--json",
             "--ldm_batch", str(args.ldm_batch)] + (["--smoke"] if args.smoke else [])
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode:
    print(f"--count_flops failed, GFLOP/s left empty:\n{result.stderr[-2000:]}", flush=True)
    return {}
  return json.loads(result.stdout.strip().splitlines()[-1])


def fill_flops(rows, flops: float):
  """Rates for rows whose compiled program's count missed the cuDNN / cuBLAS work."""
  for r in rows:
    if not r["flops"] > 0:  # nan or 0
      r.update(flops=flops, gf=flops / r["ours"] / 1e9, gf_m=flops / r["monai"] / 1e9)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[1:]))
  parser.add_argument("--cases", default=",".join(ALL_CASES))
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--ldm_batch", type=int, default=8)
  parser.add_argument("--gemm_n", type=int, default=8192)
  parser.add_argument("--smoke", action="store_true",
                      help="1/8 width, 32³ volumes, 2048² GEMM: checks the script anywhere")
  parser.add_argument("--highest", action="store_true", help="full float32 on both sides")
  parser.add_argument("--count_flops", action="store_true",
                      help="print the cases' flops (on the CPU, lowering only) and exit")
  parser.add_argument("--json", action="store_true", help="--count_flops prints one JSON line")
  parser.add_argument("--memory_no_remat", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "benchmarks", "benchmark_gpu.md"))
  args = parser.parse_args()
  cases = [c.strip() for c in args.cases.split(",") if c.strip()]
  unknown = sorted(set(cases) - set(ALL_CASES))
  if unknown:
    parser.error(f"unknown cases {unknown}; choose from {', '.join(ALL_CASES)}")
  if args.smoke:
    args.gemm_n = min(args.gemm_n, 2048)

  if args.count_flops:
    os.environ["JAX_PLATFORMS"] = "cpu"
  global jax, jnp, torch
  import jax  # pylint: disable=g-import-not-at-top,redefined-outer-name
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,redefined-outer-name
  import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name
  if args.highest:
    jax.config.update("jax_default_matmul_precision", "highest")
  torch.backends.cuda.matmul.allow_tf32 = not args.highest
  torch.backends.cudnn.allow_tf32 = not args.highest
  from brain_ldm_jax.nn import ops  # pylint: disable=g-import-not-at-top
  if args.count_flops:
    flops = count_flops(args)
    if args.json:
      print(json.dumps(flops))
    else:
      print("TFLOP per item, XLA:CPU's count of the lowered programs with native convolutions:")
      for case, count in flops.items():
        print(f"  {case:10s} {count / 1e12:8.2f}")
    return None

  # scripts/benchmark.py's modules import jax and torch, so only now that both are set up.
  import bench_cases  # pylint: disable=g-import-not-at-top
  import bench_monai  # pylint: disable=g-import-not-at-top
  import bench_report  # pylint: disable=g-import-not-at-top
  import bench_timing  # pylint: disable=g-import-not-at-top
  bench_monai.TORCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
  bench_timing.GEMM_N = args.gemm_n
  ops.set_backend()
  start = time.perf_counter()
  info = bench_report.machine_info(torch.get_num_threads())
  gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
  info.insert(1, f"- accelerator: JAX {jax.devices()[0].device_kind} ({jax.default_backend()}); "
                 f"PyTorch CUDA device: {gpu}; precision: "
                 f"{'float32 (highest) on both' if args.highest else 'default (TF32 on both)'}")
  print("\n".join(info), flush=True)
  report = bench_report.Report()
  flops = counted_flops(args) if jax.default_backend() != "cpu" else {}
  runners = {"ae_step": case_ae_step, "unet": case_unet, "ddim": case_ddim,
             "ldm_step": case_ldm_step,
             "memory": lambda r, a: bench_cases.case_memory(r, a, [("auto", "bfloat16", True)])}

  def write():
    text = bench_report.markdown(report, info, args, time.perf_counter() - start).replace(
        "on this machine", "at the paper's size on one GPU", 1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text)
    return text

  for case in cases:
    print(f"[{time.perf_counter() - start:6.0f} s] {case}", flush=True)
    try:
      rows_before = len(report.rows)
      runners[case](report, args)
      if case in flops:
        fill_flops(report.rows[rows_before:], flops[case])
    except Exception as e:  # pylint: disable=broad-except
      import traceback  # pylint: disable=g-import-not-at-top
      traceback.print_exc()
      report.notes.append(f"case {case} failed: {type(e).__name__}: {str(e)[:300]}")
    write()
  print("\n" + write())
  print(f"wrote {args.out}")


if __name__ == "__main__":
  sys.exit(main())
