r"""Benchmark the CPU conv lowerings (brain_ldm_jax.cpu) against native XLA and PyTorch.

For every shape the network uses, prints forward and forward+backward (grads w.r.t. input and
kernel) times of each lowering, PyTorch's conv3d with the same thread count, achieved GFLOP/s and
the fraction of the GEMM peak measured in the same run. Candidates are timed interleaved in one
process (`harness.interleaved`: round-robin, median of the repeats) because other jobs share the
cores. Each lowering is chosen through the one route, `ops.backend`.

  python scripts/benchmark_conv.py                       # all shapes
  python scripts/benchmark_conv.py --shapes lat20 --repeats 7 --impls native,depth_fold
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

import harness
from brain_ldm_jax.cpu import dispatch
from brain_ldm_jax.cpu import ffi
from brain_ldm_jax.cpu import host
from brain_ldm_jax.nn import ops

# name: (batch, spatial, cin, cout, kernel, stride, padding per axis)
SHAPES = {
    "ae40_1_16": (1, (40, 56, 40), 1, 16, 3, 1, (1, 1)),
    "ae40_16_1_b2": (2, (40, 56, 40), 16, 1, 3, 1, (1, 1)),  # the decoder's last conv
    "ae40_16_16": (1, (40, 56, 40), 16, 16, 3, 1, (1, 1)),
    "ae40_16_32": (1, (40, 56, 40), 16, 32, 3, 1, (1, 1)),
    "ae40_32_32": (1, (40, 56, 40), 32, 32, 3, 1, (1, 1)),
    "ae40_32_32_b2": (2, (40, 56, 40), 32, 32, 3, 1, (1, 1)),
    "down40_16": (1, (40, 56, 40), 16, 16, 3, 2, (0, 1)),
    "down40_32": (1, (40, 56, 40), 32, 32, 3, 2, (0, 1)),
    "lat20_7_32": (1, (20, 28, 20), 7, 32, 3, 1, (1, 1)),
    "lat20_32_32": (1, (20, 28, 20), 32, 32, 3, 1, (1, 1)),
    "lat20_64_64": (1, (20, 28, 20), 64, 64, 3, 1, (1, 1)),
    "lat20_128_128": (1, (20, 28, 20), 128, 128, 3, 1, (1, 1)),
    "ae40_128_128": (1, (40, 56, 40), 128, 128, 3, 1, (1, 1)),
    "down40_128": (1, (40, 56, 40), 128, 128, 3, 2, (0, 1)),
    "unet20_256_256": (1, (20, 28, 20), 256, 256, 3, 1, (1, 1)),
    "unet20_512_256": (1, (20, 28, 20), 512, 256, 3, 1, (1, 1)),  # the up path's concatenations
    "unet20_768_256": (1, (20, 28, 20), 768, 256, 3, 1, (1, 1)),
    "unet10_512_512": (1, (10, 14, 10), 512, 512, 3, 1, (1, 1)),
    "unet10_1024_512": (1, (10, 14, 10), 1024, 512, 3, 1, (1, 1)),
    "unet5_768_768": (1, (5, 7, 5), 768, 768, 3, 1, (1, 1)),  # the paper latent's lowest level
    "unet5_512_512": (1, (5, 7, 5), 512, 512, 3, 1, (1, 1)),
    "p6_768_768": (1, (6, 8, 6), 768, 768, 3, 1, (1, 1)),
    "1x1_20_256_512": (1, (20, 28, 20), 256, 512, 1, 1, (0, 0)),
    "1x1_40_16_32": (1, (40, 56, 40), 16, 32, 1, 1, (0, 0)),
    # The demo LDM train step's shapes (batch 6, latent 10x14x10 and its 5x7x5 level).
    "ldm10_32_32_b6": (6, (10, 14, 10), 32, 32, 3, 1, (1, 1)),
    "ldm10_96_32_b6": (6, (10, 14, 10), 96, 32, 3, 1, (1, 1)),
    "ldm5_64_64_b6": (6, (5, 7, 5), 64, 64, 3, 1, (1, 1)),
    # The paper's UNet widths on the benchmark's 12x16x12 latent (and its up path's concatenations).
    "p12_256_256": (1, (12, 16, 12), 256, 256, 3, 1, (1, 1)),
    "p12_512_256": (1, (12, 16, 12), 512, 256, 3, 1, (1, 1)),
    "p6_512_512": (1, (6, 8, 6), 512, 512, 3, 1, (1, 1)),
    "p3_768_768": (1, (3, 4, 3), 768, 768, 3, 1, (1, 1)),
    "p3_1536_768": (1, (3, 4, 3), 1536, 768, 3, 1, (1, 1)),
}


GEMM_N = 1536


def _gemm_fn():
  """A large float32 matmul in jax, timed among the candidates: the attainable GEMM rate."""
  a = jax.random.normal(jax.random.PRNGKey(0), (GEMM_N, GEMM_N), jnp.float32)
  mm = jax.jit(lambda a: a @ a)
  mm(a).block_until_ready()
  return lambda: mm(a).block_until_ready()


def _jax_fns(shape, impl):
  b, spatial, cin, cout, k, s, pad = shape
  nd = len(spatial)
  kw = dict(strides=(s,) * nd, padding=(pad,) * nd)

  def fwd(x, w):
    with ops.backend(impl):
      return ops.conv(x, w, **kw)

  def fwd_bwd(x, w, ct):
    y, vjp = jax.vjp(fwd, x, w)
    return y, *vjp(ct)

  return jax.jit(fwd), jax.jit(fwd_bwd)


def _torch_fns(shape, threads):
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  b, spatial, cin, cout, k, s, pad = shape
  conv_nd = torch.nn.functional.conv3d if len(spatial) == 3 else torch.nn.functional.conv2d
  x = torch.randn(b, cin, *spatial)
  w = torch.randn(cout, cin, *(k,) * len(spatial))
  # Asymmetric padding (0, 1) is an explicit pad, as the torch reference networks do it
  # (F.pad lists (lo, hi) from the last axis back; all axes pad alike here).
  pad_arg = [p for _ in spatial for p in pad]

  def run(x, w):
    if pad[0] != pad[1]:
      return conv_nd(torch.nn.functional.pad(x, pad_arg), w, stride=s)
    return conv_nd(x, w, stride=s, padding=pad[0])

  def fwd():
    with torch.no_grad():
      run(x, w)

  xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
  ct = torch.randn_like(run(x, w))

  def fwd_bwd():
    xg.grad = wg.grad = None
    run(xg, wg).backward(ct)

  return fwd, fwd_bwd


def default_impls(shape):
  """im2col's 27-way concatenation is slow on XLA:CPU: time it only where it could win (few
  channels, or few voxels so that the concatenation is small beside the weights)."""
  b, spatial, cin, cout, k, s, pad = shape
  if k == 1:
    return ["native", "onednn", "im2col", "native_im2col"]
  few = cin <= 8 or b * np.prod(spatial) <= 4096
  return (["native", "onednn", "depth_sum", "depth_fold"]
          + (["im2col", "native_im2col", "patches"] if few else [])
          + (["winograd"] if s == 1 and cin >= 32 else []))


def benchmark_shape(shape, impls, repeats, threads, with_torch):
  """{(candidate, 'fwd'|'fwd_bwd'): median seconds} for one shape."""
  b, spatial, cin, cout, k, s, pad = shape
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (b, *spatial, cin), jnp.float32)
  w = jax.random.normal(key, (*(k,) * len(spatial), cin, cout), jnp.float32)
  fns = {("gemm", "fwd"): _gemm_fn()}
  for impl in impls:
    fwd, fwd_bwd = _jax_fns(shape, impl)
    y = fwd(x, w).block_until_ready()
    ct = jnp.ones_like(y)
    jax.block_until_ready(fwd_bwd(x, w, ct))
    fns[(impl, "fwd")] = lambda fwd=fwd: fwd(x, w).block_until_ready()
    fns[(impl, "fwd_bwd")] = lambda f=fwd_bwd, ct=ct: jax.block_until_ready(f(x, w, ct))
  if with_torch:
    tf, tfb = _torch_fns(shape, threads)
    tf(), tfb()
    fns[("torch", "fwd")], fns[("torch", "fwd_bwd")] = tf, tfb
  return harness.interleaved(fns, repeats)


COLUMNS = [("impl", "l"), ("fwd ms", "r"), ("GF/s", "r"), ("%peak", "r"), ("x native", "r"),
           ("fwd+bwd ms", "r"), ("GF/s", "r"), ("%peak", "r"), ("x native", "r")]


def shape_flops(shape):
  b, spatial, cin, cout, k, s, pad = shape
  out = [(n + pad[0] + pad[1] - k) // s + 1 for n in spatial]
  return 2 * b * int(np.prod(out)) * k ** len(spatial) * cin * cout


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default="", help="comma-separated name substrings; all if empty")
  parser.add_argument("--impls", default="", help="comma-separated; default per shape")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no-torch", action="store_true")
  args = parser.parse_args()

  # XLA:CPU's intra-op pool has one thread per core; torch gets the same.
  threads = os.cpu_count()
  ops.set_backend()
  kept = host.keep_freed_memory()
  print(f"backend={jax.default_backend()} threads={threads} jax {jax.__version__}; median of "
        f"{args.repeats}, round-robin; %peak = achieved / {GEMM_N}^3 jax GEMM timed alongside; "
        f"fwd+bwd FLOPs = 3x fwd (y, dx, dw); freed memory kept (cpu.host): {kept}")
  wanted = [n for n in SHAPES if not args.shapes or any(p in n for p in args.shapes.split(","))]
  for name in wanted:
    shape = SHAPES[name]
    b, spatial, cin, cout, k, s, pad = shape
    impls = [i for i in args.impls.split(",") if i] or default_impls(shape)
    flops = shape_flops(shape)
    times = benchmark_shape(shape, impls, args.repeats, threads, not args.no_torch)
    peak = 2 * GEMM_N**3 / times[("gemm", "fwd")] / 1e9
    auto = dispatch.choose_impl((b, *spatial, cin), (*(k,) * len(spatial), cin, cout),
                                (s,) * len(spatial), "cpu", onednn=ffi.available())
    print(f"\n{name}: B={b} {'x'.join(map(str, spatial))} {cin}->{cout} k={k} s={s} pad={pad}  "
          f"{flops / 1e9:.2f} GFLOP fwd; GEMM {peak:.0f} GFLOP/s; auto={auto}")
    rows = []
    for cand in [*impls, *(["torch"] if not args.no_torch else [])]:
      row = [cand]
      for kind, mult in (("fwd", 1), ("fwd_bwd", 3)):
        t = times[(cand, kind)]
        gfs = mult * flops / t / 1e9
        ref = times.get(("native", kind))
        row += [f"{t * 1e3:.1f}", f"{gfs:.0f}", f"{100 * gfs / peak:.0f}%",
                f"{ref / t:.2f}" if ref else "-"]
      rows.append(row)
    print("\n".join(harness.markdown_table(COLUMNS, rows)), flush=True)


if __name__ == "__main__":
  main()
