r"""Entry point: `python -m brain_ldm_jax.main --config=configs/ldm.py --workdir=DIR`.

The config file picks the job (`config.job`); presets come through the config string
(`configs/ldm.py:paper`) and any field can be overridden (`--config.train_ae.num_steps=10`).
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from brain_ldm_jax import config_checks
from brain_ldm_jax import files
from brain_ldm_jax import multihost
from brain_ldm_jax.errors import UserError
from brain_ldm_jax.jobs import resolve_job
from brain_ldm_jax.nn import ops

_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Job config file, optionally with a preset: configs/ldm.py[:demo|:paper|:test]. "
    "Fields are overridden with --config.SECTION.FIELD=VALUE.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs, the synthetic cohort and outputs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for multi-host runs (jax.distributed.initialize); "
    "omit on one host or where JAX detects the cluster itself.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False,
    "Print the resolved config (every field, after overrides and derived sizes) as JSON and exit. "
    "Every job but generate also writes it to WORKDIR/config.json before it starts.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 100,
    "Multi-host runs: seconds without a heartbeat after which a process counts as lost; the "
    "others then stop with a line naming it (a lost coordinator is noticed at once).")

CONFIG_FILE = "config.json"  # the resolved config of the latest start, in the workdir
# Jobs whose workdir is the dataset they write: it holds only the dataset (byte-identical at any
# batch size or device count), and the job records its own settings in it.
_WORKDIR_IS_DATASET = ("generate",)


class _QuietLibraries:
  """Drops INFO records from orbax, grain and jax's backend probe: they log every file operation
  (and every platform that is absent), which buries our progress lines. Their warnings and errors
  still show."""

  _NOISY = ("/orbax/", "/grain/", "/jax/_src/xla_bridge.py")

  def filter(self, record) -> bool:
    return record.levelno > 20 or not any(n in record.pathname for n in self._NOISY)


def _maybe_initialize_distributed() -> None:
  """Joins a multi-host run when asked to. The launched process itself only runs the job again
  as a child and reports a lost peer in one line (see multihost); the child joins."""
  if _COORDINATOR.value is None and _NUM_PROCESSES.value is None:
    return
  if not multihost.is_child():
    sys.exit(multihost.run_child(sys.argv, _PROCESS_ID.value, _COORDINATOR.value,
                                 _HEARTBEAT_TIMEOUT.value))
  multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                       _HEARTBEAT_TIMEOUT.value)


def _exit_with(error: UserError):
  # A user's mistake gets its message, not a traceback into our code.
  logging.error("%s", error)
  print(f"error: {error}", file=sys.stderr)
  sys.exit(2)


def resolved_config():
  """The parsed config (sizes derived by the presets) with every shared field checked."""
  config = _CONFIG.value
  config_checks.check_config(config)
  return config


def write_config_json(config, workdir: str) -> None:
  if jax.process_index() == 0:  # called after jax.distributed.initialize
    files.write_json_atomic(os.path.join(workdir, CONFIG_FILE),
                            json.loads(config.to_json_best_effort()))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/ldm.py")
  if not _WORKDIR.value and not _PRINT_CONFIG.value:
    raise app.UsageError("--workdir is required: where checkpoints and outputs go")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    config = resolved_config()
    job = resolve_job(config.job)
    if _PRINT_CONFIG.value:
      print(config.to_json_best_effort(indent=2))
      return
    _maybe_initialize_distributed()
    ops.set_backend()  # after joining a multi-host run: it asks JAX for the platform
    os.makedirs(_WORKDIR.value, exist_ok=True)
    if config.job not in _WORKDIR_IS_DATASET:
      write_config_json(config, _WORKDIR.value)
    job(config, _WORKDIR.value)
  except UserError as e:
    _exit_with(e)


def _user_error(error: BaseException) -> UserError | None:
  """The UserError behind an exception, if any (absl and config_flags wrap what get_config
  raises in their own errors, with the traceback in the message)."""
  cause = error.__cause__ or error.__context__
  inner = _user_error(cause) if cause is not None else None
  return inner or (error if isinstance(error, UserError) else None)


def _parse_flags(argv):
  """absl's flag parsing, but a UserError from a config file (e.g. an unknown preset) is one
  line like any other user mistake."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    user_error = _user_error(e)
    if user_error is not None:  # logging is not set up yet: the line alone
      print(f"error: {user_error}", file=sys.stderr)
      sys.exit(2)
    print(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.",
          file=sys.stderr)
    sys.exit(1)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
