"""scripts/benchmark.py's results: rows as the cases measure them, the machine, the markdown.

Imports jax and torch: scripts/benchmark.py imports this module once the thread count is set.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys

import jax
import monai
import numpy as np
import torch

import bench_timing
import harness
from brain_ldm_jax.cpu import host


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
    peak = bench_timing.gemm_gflops(gemm_s)
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


def machine_info(threads) -> list[str]:
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
  gemm_n = bench_timing.GEMM_N
  lines = ["# brain_ldm_jax vs MONAI on this machine", "", *info,
           f"- median of {args.repeats} after a warm-up; ours and MONAI alternate with a "
           f"{gemm_n}² float32 jax GEMM in every round, every other round in reverse order; "
           f"total wall time {wall_s / 60:.1f} min", ""]
  if report.rows:
    peaks = [r["peak"] for r in report.rows]
    lines += [f"GEMM peak measured alongside: {min(peaks):.0f}–{max(peaks):.0f} GFLOP/s "
              f"({gemm_n}² float32 matmul in jax, default precision).", ""]
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
