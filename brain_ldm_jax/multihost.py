"""Multi-process runs: joining the cluster, and one clear line when a peer process is lost.

When a process of a multi-host run dies, JAX's distributed runtime ends the others from C++: the
coordination service notices the missing heartbeats (or the lost coordinator) and every survivor
aborts with a fatal log and a stack dump. That abort cannot be caught in Python (it happens on a
runtime thread, and this jaxlib cannot call a Python `missed_heartbeat_callback`). So a
multi-process job runs in a child process whose stderr this, the launched process, reads: lines
pass through as they come, and when the child ends because the runtime reported a lost peer, the
launched process prints one line naming that peer instead of the dump and exits 1. SIGTERM to
the launched process is passed on to the child, where JAX's preemption notifier takes it
(`multihost_utils.reached_preemption_sync_point`, used by the training loop).
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence

CHILD_ENV = "BRAIN_LDM_JAX_DISTRIBUTED_CHILD"
LOST_PEER_EXIT = 1

# What JAX's runtime prints when it ends a process over another one's failure, and the lines that
# start a report which, when it turns out to be about a lost peer, is replaced by one line.
_FATAL = "Terminating process because the JAX distributed service detected fatal errors"
_REPORT_STARTS = ("Traceback (most recent call last)", "coordination_service",
                  "Failed to retrieve preemption notice", _FATAL)
_UNHEALTHY = "The following tasks are unhealthy"
_LOST_COORDINATOR = "Failed to send RPC to coordination service"


def is_child() -> bool:
  return os.environ.get(CHILD_ENV) == "1"


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, heartbeat_timeout_s: int) -> None:
  """jax.distributed.initialize; a process silent for `heartbeat_timeout_s` counts as lost."""
  # jax only here: the launching process (run_child) never loads it.
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_s)


class StderrReport:
  """The child's stderr: passed through line by line, except a possible lost-peer report.

  From the first line that may start such a report (a traceback, a coordination-service error),
  lines are held back; `lost_peer()` says afterwards whether the runtime ended the child over a
  lost peer, and `release()` passes the held lines on when it did not.
  """

  def __init__(self, out):
    self._out = out
    self._held: list[str] = []
    self._fatal = False

  def feed(self, line: str) -> None:
    if self._held or any(marker in line for marker in _REPORT_STARTS):
      self._held.append(line)
      self._fatal = self._fatal or _FATAL in line
    else:
      self._out.write(line)
      self._out.flush()

  def lost_peer(self) -> str | None:
    """'process 1', 'process 0 (the coordinator)', or None when no peer was reported lost."""
    if not self._fatal:
      return None
    text = "".join(self._held)
    if _LOST_COORDINATOR in text:
      return "process 0 (the coordinator)"
    found = re.search(re.escape(_UNHEALTHY) + r"[^\n]*\n([^\n]*)", text)
    if found:
      ids = sorted({int(i) for i in re.findall(r"(?:task:)?(\d+)", found.group(1))})
      if ids:
        return ", ".join(f"process {i}" for i in ids)
    return "another process"

  def release(self) -> None:
    self._out.write("".join(self._held))
    self._out.flush()
    self._held = []


def _die_with_parent() -> None:
  # The child must not outlive the launched process (e.g. when a scheduler kills that one with
  # SIGKILL): Linux's parent-death signal.
  PR_SET_PDEATHSIG = 1
  ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def lost_peer_message(peer: str, process_id: int | None, coordinator: str | None,
                      heartbeat_timeout_s: int) -> str:
  where = f" at {coordinator}" if coordinator else ""
  return (f"error: process {process_id} lost {peer} of the multi-host run{where} (no heartbeat "
          f"within --heartbeat_timeout_s={heartbeat_timeout_s} or connection closed); stopping. "
          "Restart every process with the same command to resume from the last checkpoint.")


def run_child(argv: Sequence[str], process_id: int | None, coordinator: str | None,
              heartbeat_timeout_s: int) -> int:
  """Runs this command (`argv`, as in sys.argv) again as a child; returns the exit status to
  exit with: the child's, or LOST_PEER_EXIT after one line when it was ended over a lost peer."""
  env = dict(os.environ, **{CHILD_ENV: "1"})
  child = subprocess.Popen([sys.executable, "-m", "brain_ldm_jax.main", *argv[1:]], env=env,
                           stderr=subprocess.PIPE, text=True, errors="replace",
                           preexec_fn=_die_with_parent)
  signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the child itself
  report = StderrReport(sys.stderr)
  for line in child.stderr:
    report.feed(line)
  code = child.wait()
  peer = report.lost_peer()
  if peer is not None:
    print(lost_peer_message(peer, process_id, coordinator, heartbeat_timeout_s), file=sys.stderr)
    return LOST_PEER_EXIT
  report.release()
  return code if code >= 0 else 128 - code


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name`; nothing to wait for in one process."""
  # jax is imported here, not above: the launching process (run_child) never loads it.
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
