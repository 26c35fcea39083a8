"""Reading a multi-process child's stderr: what jaxlib prints when it ends a process over a lost
peer (captured from two real CPU processes, one killed with SIGKILL; timestamps and stack frames
trimmed) becomes one line naming that peer; anything else passes through unchanged.

The end-to-end case (a real run, a real kill) is tests/test_train.py::
test_lost_peer_stops_the_survivor_with_one_line.
"""

from __future__ import annotations

import io

from brain_ldm_jax import multihost

_FATAL = ("F1206 22:29:19.757862    5674 client.h:80] Terminating process because the JAX "
          "distributed service detected fatal errors. This most likely indicates that another task "
          "died; see the other task logs for more details. Disable Python buffering, i.e. "
          "`python -u`, to be sure to see all the previous output. absl::Status: UNAVAILABLE: ")

# The coordinator (process 0) when process 1 stopped sending heartbeats.
LOST_WORKER = [
    "I1206 22:29:10.0 reporting.py:100] autoencoder 5/1000 | loss=0.9 | 1.0 steps/s\n",
    "E1206 22:29:19.757217    5663 coordination_service.cc:1549] [7388359875106432015] Use error "
    "polling to propagate the following error to all tasks: UNAVAILABLE: The following tasks are "
    "unhealthy (stopped sending heartbeats):\n",
    "1\n",
    "The tasks have crashed. Check the task logs for an earlier error.\n",
    _FATAL + "The following tasks are unhealthy (stopped sending heartbeats):\n",
    "1\n",
    "*** Check failure stack trace: ***\n",
    "    @     0x7f053d10c93b  std::_Function_handler<>::_M_invoke()\n",
]

# Process 1 when the coordinator died: the failed collective's traceback comes first.
LOST_COORDINATOR = [
    "W1206 23:37:10.161577    1016 preemption_sync_manager.cc:147] Failed to retrieve preemption "
    "notice from coordination service: UNAVAILABLE: Socket closed\n",
    "Traceback (most recent call last):\n",
    '  File "/work/main/.venv/lib/python3.11/site-packages/jax/_src/api.py", line 2492\n',
    "jax.errors.JaxRuntimeError: INTERNAL: Gloo all-reduce failed: Connection reset by peer\n",
    _FATAL + "Failed to send RPC to coordination service. Either the leader task was\n",
    ':UNKNOWN:Error received from peer  {grpc_message:"Socket closed", grpc_status:14}\n',
    "*** Check failure stack trace: ***\n",
]


def _read(lines):
  out = io.StringIO()
  report = multihost.StderrReport(out)
  for line in lines:
    report.feed(line)
  return report, out


def test_a_lost_worker_is_named_and_the_dump_held_back():
  report, out = _read(LOST_WORKER)
  assert report.lost_peer() == "process 1"
  assert out.getvalue() == LOST_WORKER[0]  # the progress line passed through, nothing after it


def test_a_lost_coordinator_is_named():
  report, out = _read(LOST_COORDINATOR)
  assert report.lost_peer() == "process 0 (the coordinator)"
  assert out.getvalue() == ""


def test_a_traceback_of_its_own_passes_through():
  lines = ["I1206 progress\n", "Traceback (most recent call last):\n", "ValueError: bad\n"]
  report, out = _read(lines)
  assert report.lost_peer() is None
  report.release()
  assert out.getvalue() == "".join(lines)
