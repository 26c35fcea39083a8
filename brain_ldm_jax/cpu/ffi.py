"""Building, loading and registering the C++ FFI handlers of `onednn_conv.cc` with XLA:CPU.

`load()` does it, once per process, when the backend is chosen (`nn.ops.set_backend`), never
while a function is traced: it compiles `onednn_conv.cc` (next to this file) with the system C++
compiler against the installed jaxlib's FFI headers into a per-user cache (`$BRAIN_LDM_CACHE`,
default ~/.cache/brain_ldm_jax, or the temp directory when that is read-only), keyed by the source
and the jaxlib version; later processes load the cached library. oneDNN itself comes from the
`onednn-cpu-gomp` wheel (a dependency on Linux x86-64), or from the library
`$BRAIN_LDM_ONEDNN_LIB` names, opened with dlopen; nothing is linked. Without a compiler or
library the handlers are unavailable and the CPU convolutions use the XLA lowerings.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
from pathlib import Path
import shutil
import subprocess
import tempfile

from absl import logging
import jax

TARGET = "brain_ldm_jax_onednn_conv"
PATCHES_TARGET = "brain_ldm_jax_patches_conv"
UPSAMPLE_TARGET = "brain_ldm_jax_upsample_conv"
PREPARE_TARGET = "brain_ldm_jax_onednn_prepare_kernel"
MATMUL_TARGET = "brain_ldm_jax_onednn_matmul"
PROBE_TARGET = "brain_ldm_jax_probe"
MATERIALIZE_TARGET = "brain_ldm_jax_materialize"

# XLA custom-call target -> the handler's exported symbol.
_SYMBOLS = {
    TARGET: "BldmOnednnConvolution",
    PATCHES_TARGET: "BldmPatchesConvolution",
    UPSAMPLE_TARGET: "BldmUpsampleConvolution",
    PREPARE_TARGET: "BldmOnednnPrepareKernel",
    MATMUL_TARGET: "BldmOnednnMatmul",
    PROBE_TARGET: "BldmProbe",
    MATERIALIZE_TARGET: "BldmMaterialize",
}
SOURCE = Path(__file__).with_name("onednn_conv.cc")
_DIST = "onednn-cpu-gomp"
_LIB_NAME = "libdnnl.so.3"
_NOT_LOADED = ("the oneDNN handlers are not loaded: choose the backend first "
               "(brain_ldm_jax.nn.ops.set_backend)")


class OnednnUnavailableError(RuntimeError):
  """The oneDNN handlers could not be built or loaded; the message says why."""


# Whether `load` has run, and why the handlers are unavailable (None: they are available).
_status: dict[str, object] = {"tried": False, "reason": _NOT_LOADED}


def available() -> bool:
  """Whether `load()` has built, loaded and registered the handlers. Never builds."""
  return _status["reason"] is None


def unavailable_reason() -> str | None:
  """None when `available()`, else why not (not loaded yet, missing library or compiler...)."""
  return _status["reason"]  # type: ignore[return-value]


def require(what: str) -> None:
  """Raises OnednnUnavailableError naming `what` unless the handlers are available."""
  if not available():
    raise OnednnUnavailableError(f"{what} is unavailable: {unavailable_reason()}")


def load() -> str | None:
  """Builds (or finds in the cache), loads and registers the handlers, once per process; logs
  the outcome. Returns None, or why they are unavailable (the XLA lowerings are used then)."""
  if _status["tried"]:
    return unavailable_reason()
  _status["tried"] = True
  try:
    library = onednn_library()
    handler = handler_library()
    handler.BldmOnednnLoad.restype = ctypes.c_char_p
    handler.BldmOnednnLoad.argtypes = [ctypes.c_char_p]
    handler.BldmOnednnPreparedKernelBytes.restype = ctypes.c_int64
    error = handler.BldmOnednnLoad(str(library).encode())
    if error is not None:
      raise OnednnUnavailableError(error.decode())
    for target, symbol in _SYMBOLS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handler, symbol)),
                                  platform="cpu")
  except (OnednnUnavailableError, OSError) as e:
    logging.warning("brain_ldm_jax: oneDNN convolutions unavailable, CPU convolutions use the "
                    "slower XLA lowerings: %s", e)
    _status["reason"] = str(e)
    return str(e)
  logging.info("brain_ldm_jax: oneDNN CPU kernels loaded (%s, handler %s)", library,
               handler._name)  # pylint: disable=protected-access
  _status["reason"] = None
  return None


@functools.cache
def handler_library() -> ctypes.CDLL:
  return ctypes.CDLL(str(build()))


def onednn_library() -> Path:
  override = os.environ.get("BRAIN_LDM_ONEDNN_LIB")
  if override:
    if not Path(override).is_file():
      raise OnednnUnavailableError(f"BRAIN_LDM_ONEDNN_LIB={override} is not a file")
    return Path(override)
  try:
    files = importlib.metadata.distribution(_DIST).files or []
  except importlib.metadata.PackageNotFoundError:
    raise OnednnUnavailableError(
        f"the {_DIST} package is not installed (pip install {_DIST}), and BRAIN_LDM_ONEDNN_LIB "
        "names no oneDNN v3 library") from None
  for f in files:
    if f.name == _LIB_NAME:
      return Path(f.locate()).resolve()
  raise OnednnUnavailableError(f"the {_DIST} package has no {_LIB_NAME}")


def _cache_dirs() -> list[Path]:
  if os.environ.get("BRAIN_LDM_CACHE"):
    return [Path(os.environ["BRAIN_LDM_CACHE"])]
  user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
  # A read-only home (some CI and cluster setups) falls back to the temp directory.
  return [user_cache / "brain_ldm_jax",
          Path(tempfile.gettempdir()) / f"brain_ldm_jax-{os.getuid()}"]


def build() -> Path:
  """The compiled handler: from the cache when its source and jaxlib are unchanged, else built."""
  import jaxlib  # pylint: disable=g-import-not-at-top

  source = SOURCE.read_bytes()
  # -O3: GCC vectorizes the handlers' summing loops (unknown trip counts) only from there.
  flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-w"]
  key = hashlib.sha256(source + jaxlib.__version__.encode() + " ".join(flags).encode())
  name = f"onednn_conv-{key.hexdigest()[:16]}.so"
  for cache in _cache_dirs():
    if (cache / name).is_file():
      return cache / name
  compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if compiler is None:
    raise OnednnUnavailableError("no C++ compiler found (set CXX, or install g++)")
  errors = []
  for cache in _cache_dirs():
    try:
      cache.mkdir(parents=True, exist_ok=True)
      return _compile(compiler, flags, cache / name)
    except PermissionError as e:
      errors.append(str(e))
  raise OnednnUnavailableError(f"no writable cache directory for {name}: {'; '.join(errors)}")


def _compile(compiler: str, flags: list[str], target: Path) -> Path:
  # Build beside the target and rename: concurrent processes never load a half-written library.
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    partial = Path(tmp) / target.name
    cmd = [compiler, *flags, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(partial), "-ldl"]
    logging.info("brain_ldm_jax: building the oneDNN handler: %s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
      raise OnednnUnavailableError(f"building {SOURCE.name} failed ({' '.join(cmd)}):\n"
                                   f"{done.stderr[-2000:]}")
    os.replace(partial, target)
  return target
