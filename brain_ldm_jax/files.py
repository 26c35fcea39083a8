"""Files written whole or not at all, and disk errors a user can act on.

Every file the project writes goes through `atomic_path`: it is written under a temporary name
(`.tmp-*`) in its final folder and renamed over the target, so a reader (or a rerun after a
kill) never sees half a file. A killed writer can leave a temporary behind; `remove_temporaries`
clears them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
from collections.abc import Iterator
from typing import Any

from brain_ldm_jax.errors import DataError

TMP_PREFIX = ".tmp-"  # every temporary file starts with it


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """A temporary path beside `path` to write; renamed to `path` when the block succeeds,
  removed when it fails. The folder is created if needed."""
  path = os.fspath(path)
  folder, name = os.path.split(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  # pid and thread: concurrent writers (processes, writer threads) never share a temporary; the
  # name keeps its extension, which some writers (nibabel) read.
  tmp = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{name}")
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically (flushed to disk before the rename)."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes UTF-8 `text` to `path` atomically, line endings as given."""
  write_bytes_atomic(path, text.encode("utf-8"))


def json_text(obj: Any) -> str:
  """Deterministic JSON (sorted keys, no timestamps): reruns write the same bytes."""
  return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes `obj` as `json_text` to `path` atomically. In a multi-process run only one process
  may call it for a shared path (usually process 0)."""
  write_text_atomic(path, json_text(obj))


def remove_temporaries(folder: str) -> int:
  """Deletes leftover `.tmp-*` files of a killed run in `folder`; returns how many."""
  removed = 0
  with contextlib.suppress(FileNotFoundError):
    for entry in os.scandir(folder):
      if entry.name.startswith(TMP_PREFIX) and entry.is_file(follow_symlinks=False):
        with contextlib.suppress(FileNotFoundError):
          os.remove(entry.path)
          removed += 1
  return removed


@contextlib.contextmanager
def disk_errors(directory: str) -> Iterator[None]:
  """A full disk (or quota) becomes a DataError saying where, and that a rerun resumes."""
  try:
    yield
  except OSError as e:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      raise DataError(f"no space left on the device holding {directory} ({e.strerror}); free "
                      "space and rerun the same command: finished subjects are kept and the "
                      "rest resumes") from e
    raise
