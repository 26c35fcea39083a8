"""The benchmark scripts' shared harness: threads, one timing function, one table printer.

    threads = harness.set_threads(args.threads)        # before jax starts
    times = harness.interleaved({"ours": f, "monai": g}, repeats=5)
    print(harness.markdown_table([("case", "l"), ("ms", "r")], [["x", f"{times['ours']:.1f}"]]))

Candidates are timed interleaved in one process (round-robin, every other round reversed, after
a warm-up call each) because other jobs share the cores: load spikes and drift hit all alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import os
import statistics
import time


def set_threads(threads: int) -> int:
  """Pins this process to `threads` cores (0: all) before jax starts: XLA:CPU's intra-op pool
  takes its size from the schedulable CPUs; oneDNN's OpenMP pool gets the same count. Returns
  the count, for torch.set_num_threads."""
  cpus = sorted(os.sched_getaffinity(0))
  threads = min(threads or len(cpus), len(cpus))
  if threads < len(cpus):
    os.sched_setaffinity(0, cpus[:threads])
  os.environ["OMP_NUM_THREADS"] = str(threads)  # oneDNN's convolutions (GNU OpenMP)
  if threads == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false").strip()
  return threads


class Timings(dict):
  """{name: median seconds}, with every round's seconds in `rounds` ({name: [seconds]})."""

  def __init__(self, rounds: dict):
    super().__init__({name: statistics.median(ts) for name, ts in rounds.items()})
    self.rounds = rounds


def interleaved(fns: dict, repeats: int, *, warmup: bool = True,
                sync: Callable[[], None] = lambda: None) -> Timings:
  """Each round calls every candidate once (after one warm-up each), every other round in
  reverse order, so that a steady drift of the host's speed hits all alike (two rounds:
  A B B A). Each call must block on its result; `sync` runs after each (e.g. waiting for a
  GPU's queued work)."""
  for fn in fns.values() if warmup else ():
    fn()
    sync()
  times = {name: [] for name in fns}
  for round_ in range(repeats):
    for name, fn in (reversed if round_ % 2 else iter)(list(fns.items())):
      t0 = time.perf_counter()
      fn()
      sync()
      times[name].append(time.perf_counter() - t0)
  return Timings(times)


def markdown_table(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence]) -> list[str]:
  """A markdown table's lines: `columns` are (title, "l" or "r" alignment), rows their cells."""
  rule = {"l": "---", "r": "---:"}
  lines = ["| " + " | ".join(title for title, _ in columns) + " |",
           "|" + "|".join(rule[align] for _, align in columns) + "|"]
  for row in rows:
    if len(row) != len(columns):
      raise ValueError(f"a row of {len(row)} cells for {len(columns)} columns: {row}")
    lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
  return lines
