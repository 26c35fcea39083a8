r"""What is alive at the memory peak of the paper autoencoder train step, as XLA compiles it.

    python scripts/memory_peak.py                          # 160×224×160, batch 1, remat
    python scripts/memory_peak.py --shape 80,112,80        # the same peak at 1/8 the size
    python scripts/memory_peak.py --conv_impl native --dtype bfloat16 --top 20
    python scripts/memory_peak.py --load_run               # what api.load_run reads vs the states

Compiles (does not run) the adversarial step of `train/autoencoder.py` with the paper preset,
dumps the optimised HLO for the default backend (CPU or GPU), and replays its schedule: every
buffer lives from the instruction that defines it to its last use (bitcasts and tuple elements
alias their operand; a cuDNN call's scratch space lives only during the call). It prints XLA's own
temp size, this estimate of the peak (an estimate: XLA writes some outputs in place of their
inputs, and its heap packing fragments: at the paper size 10.0 vs 11.3 GiB), the instruction at
the peak with the network op that made it, and the largest buffers alive there, with their live
ranges; `--curve` adds the other local maxima above a threshold. This is how the step was taken
from 28 to 11.5 GiB (benchmarks/benchmark.md).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import sys
import tempfile

_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
          "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_ALIASES = ("bitcast", "get-tuple-element")
_NOT_BUFFERS = ("parameter", "tuple", "constant")


def shape_bytes(shape: str) -> int:
  total = 0
  for dtype, dims in re.findall(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]", shape):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES[dtype]
  return total


def entry_instructions(hlo_text: str) -> list[dict]:
  """The entry computation's instructions in schedule order: name, shape, op, operands, op_name."""
  body = re.search(r"^ENTRY [^\n]*\{\n(.*?)^\}", hlo_text, re.S | re.M).group(1)
  out = []
  for line in filter(None, (l.strip() for l in body.split("\n"))):
    m = re.match(r"(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$", line)
    if not m:
      continue
    name, shape, op, rest = m.groups()
    operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
    op_name = re.search(r'op_name="([^"]*)"', line)
    size = shape_bytes(shape)
    if op == "custom-call" and 'custom_call_target="__cudnn' in line:
      size -= sum(shape_bytes(u8) for u8 in re.findall(r"\bu8\[\d+\]", shape))  # scratch space
    out.append(dict(name=name, shape=shape, op=op, operands=operands, bytes=size,
                    op_name=op_name.group(1) if op_name else ""))
  return out


def live_ranges(insts: list[dict]) -> dict[str, tuple[int, int]]:
  """name -> (defining index, last-use index) for every instruction that owns a buffer."""
  index = {ins["name"]: i for i, ins in enumerate(insts)}
  alias_of = {ins["name"]: ins["operands"][0] for ins in insts
              if ins["op"] in _ALIASES and ins["operands"] and ins["operands"][0] in index}

  def owner(name):
    while name in alias_of:
      name = alias_of[name]
    return name

  last = {}
  for i, ins in enumerate(insts):
    for operand in ins["operands"]:
      if operand in index:
        last[owner(operand)] = i
  return {ins["name"]: (i, max(i, last.get(ins["name"], i))) for i, ins in enumerate(insts)
          if ins["name"] not in alias_of and ins["op"] not in _NOT_BUFFERS}


def live_curve(insts, ranges) -> list[int]:
  delta = [0] * (len(insts) + 1)
  for name, (start, end) in ranges.items():
    size = insts[start]["bytes"]
    delta[start] += size
    delta[end + 1] -= size
  curve, total = [], 0
  for d in delta[:-1]:
    total += d
    curve.append(total)
  return curve


def report(insts, ranges, top: int, curve_threshold_gib: float | None) -> None:
  gib = lambda n: n / 2**30  # noqa: E731
  curve = live_curve(insts, ranges)
  peak = max(range(len(curve)), key=curve.__getitem__)
  print(f"estimated peak {gib(curve[peak]):.2f} GiB at instruction {peak}/{len(insts)}: "
        f"{insts[peak]['op']} {insts[peak]['op_name'][-110:]}")
  alive = sorted(((insts[s]["bytes"], name) for name, (s, e) in ranges.items() if s <= peak <= e),
                 reverse=True)
  for size, name in alive[:top]:
    start, end = ranges[name]
    ins = insts[start]
    print(f"  {gib(size):7.3f} GiB  {ins['shape'][:42]:42s} [{start:5d},{end:5d}] "
          f"{ins['op']:12s} {ins['op_name'][-100:]}")
  print(f"  {gib(sum(s for s, _ in alive[top:])):7.3f} GiB  in {len(alive[top:])} smaller buffers")
  if curve_threshold_gib is not None:
    print(f"local maxima above {curve_threshold_gib} GiB:")
    last = -100
    for i in range(1, len(curve) - 1):
      if (gib(curve[i]) >= curve_threshold_gib and curve[i - 1] <= curve[i] >= curve[i + 1]
          and i - last > 15):
        print(f"  {gib(curve[i]):6.2f} GiB at {i}: {insts[i]['op_name'][-100:]}")
        last = i


def load_run_bytes() -> None:
  """Bytes of the paper preset's train states against what `api.load_run` restores of them.

  From abstract states (jax.eval_shape: nothing is allocated). load_run holds what it restores on
  one device (host memory on CPU); verifying the digests reads it in place.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax import presets  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax.train import autoencoder as ae_stage  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax.train import ldm as ldm_stage  # pylint: disable=g-import-not-at-top

  config = presets.base_config("paper")
  mesh = sharding_lib.make_mesh(config.mesh)
  nbytes = lambda x: x.size * x.dtype.itemsize  # noqa: E731
  size = lambda tree: sum(map(nbytes, jax.tree.leaves(tree)))  # noqa: E731
  gib = lambda n: n / 2**30  # noqa: E731
  states = {"autoencoder": (ae_stage.build(config, mesh, jax.random.key(0))["abstract"], "params"),
            "ldm": (ldm_stage.build(config, mesh, jax.random.key(0))["abstract"], "ema_params")}
  total_state = total_read = 0
  for name, (state, key) in states.items():
    read = getattr(state, key)
    total_state, total_read = total_state + size(state), total_read + size(read)
    largest = max(map(nbytes, jax.tree.leaves(read)))
    print(f"{name:12s} train state {gib(size(state)):6.2f} GiB; load_run reads {key} "
          f"{gib(size(read)):6.2f} GiB (largest array {gib(largest):.3f} GiB)")
  print(f"{'both':12s} train state {gib(total_state):6.2f} GiB; load_run reads "
        f"{gib(total_read):6.2f} GiB")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shape", default="160,224,160", help="image shape (default: the paper's)")
  parser.add_argument("--conv_impl", default="auto", help="the backend (nn.ops.BACKENDS)")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--no_remat", action="store_true")
  parser.add_argument("--top", type=int, default=12, help="buffers to list at the peak")
  parser.add_argument("--curve", type=float, default=None, metavar="GIB",
                      help="also list the local maxima above GIB")
  parser.add_argument("--keep_dump", action="store_true", help="keep the HLO dump (else deleted)")
  parser.add_argument("--load_run", action="store_true",
                      help="print what api.load_run reads of the paper states, and exit")
  args = parser.parse_args(argv)
  if args.load_run:
    load_run_bytes()
    return
  dump = tempfile.mkdtemp(prefix="memory_peak_")
  # XLA reads its flags once, when the backend starts: before jax is imported.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_dump_to={dump} --xla_dump_hlo_as_text").strip()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax import presets  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax.nn import ops  # pylint: disable=g-import-not-at-top
  from brain_ldm_jax.train import autoencoder as ae_stage  # pylint: disable=g-import-not-at-top

  ops.set_backend(args.conv_impl)
  config = presets.base_config("paper")
  config.data.shape = tuple(int(s) for s in args.shape.split(","))
  config.autoencoder.remat = not args.no_remat
  config.autoencoder.dtype = args.dtype
  config.train_ae.batch_size = 1
  mesh = sharding_lib.make_mesh(config.mesh)
  built = ae_stage.build(config, mesh, jax.random.key(0))
  image = jax.ShapeDtypeStruct((1, *config.data.shape, 1), jnp.float32,
                               sharding=sharding_lib.batch_sharding(mesh))
  compiled = built["adversarial_step"].lower(built["abstract"], {"image": image}).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  print(f"{args.shape}, conv {args.conv_impl}, {args.dtype}, remat={not args.no_remat}: "
        f"XLA temp {temp / 2**30:.2f} GiB")
  files = glob.glob(os.path.join(dump, "*ae_train_step*after_optimizations.txt"))
  if not files:
    sys.exit(f"no optimised HLO of the train step in {dump}")
  insts = entry_instructions(open(files[0]).read())
  report(insts, live_ranges(insts), args.top, args.curve)
  if args.keep_dump:
    print(f"HLO dump: {dump}")
  else:
    shutil.rmtree(dump, ignore_errors=True)


if __name__ == "__main__":
  main()
