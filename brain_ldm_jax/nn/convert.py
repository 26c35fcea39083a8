"""Weight conversion between MONAI PyTorch state dicts and Flax variables, both ways.

Flax module names mirror MONAI's state-dict names, so one mechanical rule maps every leaf:
list members `blocks_3` <-> `blocks.3` (also resnets, attentions, transformer_blocks, down_blocks,
up_blocks, time_embed, out; the discriminator's `layers_3` <-> `3` and `adn_N` <-> `adn.N`), and

  conv  kernel (*k, I, O)  <-> `<path>.conv.weight` (O, I, *k)   (MONAI wraps convs in Convolution;
                                                                 the discriminator's Flax tree
                                                                 already has the `conv` level)
  dense kernel (I, O)      <-> `<path>.weight` (O, I)
  norm scale / bias        <-> `<path>.weight` / `<path>.bias`
  embed embedding          <-> `<path>.weight`
  batch_stats mean / var / num_batches_tracked <-> running_mean / running_var / num_batches_tracked

Older MONAI GenerativeModels names (the published bundle's weights) load too: for every expected
MONAI-core key that is absent, its GenerativeModels spellings are tried (`attn{1,2}.to_out.0` for
`out_proj`, `conv` for the decoder's `postconv`, `to_q`/`proj_attn` for the AE attention's
`attn.to_q`/`attn.out_proj`, and `ff.net.0.proj`/`ff.net.2` for `ff.linear1`/`ff.linear2`).
Export always writes MONAI-core names.

Files: `load_state_dict(path)` reads .pt/.pth/.ckpt/.bin through `torch.load(weights_only=True)`
(never arbitrary unpickling), .safetensors and .npz.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from brain_ldm_jax.nn import autoencoder
from brain_ldm_jax.nn import discriminator
from brain_ldm_jax.nn import unet

KINDS = ("autoencoder", "unet", "discriminator")
_LIST = re.compile(r"^(blocks|resnets|attentions|transformer_blocks|down_blocks|up_blocks|"
                   r"time_embed|out)_(\d+)$")
_LEAF = {"scale": "weight", "bias": "bias", "embedding": "weight", "mean": "running_mean",
         "var": "running_var", "num_batches_tracked": "num_batches_tracked"}


def _check_kind(kind: str):
  if kind not in KINDS:
    raise ValueError(f"unknown network kind {kind!r}: choose one of {KINDS}")


def monai_key(path: tuple[str, ...], kind: str, is_conv: bool) -> str:
  """The MONAI state-dict key of the Flax leaf at `path` (collection first).

  `is_conv`: the leaf belongs to a convolution (its module's kernel has more than 2 dims).
  """
  _check_kind(kind)
  *modules, leaf = path[1:]  # drop the collection ("params" / "batch_stats")
  parts = []
  for m in modules:
    match = _LIST.match(m)
    if match:
      parts += [match.group(1), match.group(2)]
    elif kind == "discriminator" and re.fullmatch(r"layers_\d+", m):
      parts.append(m.split("_")[1])
    elif kind == "discriminator" and m == "adn_N":
      parts += ["adn", "N"]
    else:
      parts.append(m)
  # MONAI wraps every conv in a `Convolution` whose torch conv is `.conv`; the discriminator's
  # Flax tree already has that level (its layers also hold the norm).
  if is_conv and kind != "discriminator" and leaf in ("kernel", "bias"):
    parts.append("conv")
  if leaf == "kernel":
    parts.append("weight")
  elif leaf in _LEAF:
    parts.append(_LEAF[leaf])
  else:
    raise ValueError(f"no MONAI name for Flax leaf {'/'.join(path)}")
  return ".".join(parts)


def _flat(tree) -> dict[tuple[str, ...], Any]:
  return {tuple(k): v for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()}


def _keys_for(flat: Mapping[tuple[str, ...], Any], kind: str) -> dict[tuple[str, ...], str]:
  conv_modules = {p[:-1] for p, v in flat.items() if p[-1] == "kernel" and len(v.shape) > 2}
  return {p: monai_key(p, kind, p[:-1] in conv_modules) for p in flat}


def _to_flax_layout(a: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel":
    if a.ndim > 2:  # (O, I, *k) -> (*k, I, O)
      return np.transpose(a, tuple(range(2, a.ndim)) + (1, 0))
    return a.T
  return a


def _to_monai_layout(a: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel":
    if a.ndim > 2:  # (*k, I, O) -> (O, I, *k)
      nd = a.ndim - 2
      return np.transpose(a, (nd + 1, nd) + tuple(range(nd)))
    return a.T
  return a


def _monai_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  """The shape `_to_monai_layout` gives an array of `shape`."""
  if leaf == "kernel":
    return (shape[-1], shape[-2], *shape[:-2]) if len(shape) > 2 else tuple(reversed(shape))
  return tuple(shape)


def _legacy_names(key: str) -> list[str]:
  """GenerativeModels spellings of a MONAI-core key (most specific first)."""
  out = []
  m = re.fullmatch(r"(.*\.attn\d)\.out_proj\.(weight|bias)", key)
  if m:
    out.append(f"{m.group(1)}.to_out.0.{m.group(2)}")
  m = re.fullmatch(r"(.*)\.attn\.(to_q|to_k|to_v)\.(weight|bias)", key)
  if m:
    out.append(f"{m.group(1)}.{m.group(2)}.{m.group(3)}")
  m = re.fullmatch(r"(.*)\.attn\.out_proj\.(weight|bias)", key)
  if m:
    out.append(f"{m.group(1)}.proj_attn.{m.group(2)}")
  if ".ff.linear1." in key:
    out.append(key.replace(".ff.linear1.", ".ff.net.0.proj."))
  if ".ff.linear2." in key:
    out.append(key.replace(".ff.linear2.", ".ff.net.2."))
  if ".postconv." in key:
    out.append(key.replace(".postconv.", ".conv."))
  return out


def _numpy(v) -> np.ndarray:
  if hasattr(v, "detach"):  # torch.Tensor, without importing torch here
    v = v.detach().cpu()
    if str(v.dtype) == "torch.bfloat16":
      v = v.float()
    # Copy: numpy() shares memory with the tensor, and jnp.asarray may alias numpy memory on CPU,
    # so an in-place torch update (e.g. BatchNorm running stats) would change our params.
    return v.numpy().copy()
  return np.asarray(v)


def _normalise_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  sd = {k: _numpy(v) for k, v in state_dict.items()}
  if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel/DDP
    sd = {k[len("module."):]: v for k, v in sd.items()}
  return sd


def example_inputs(module: nn.Module) -> tuple[tuple, dict]:
  """Small dummy (args, kwargs) that initialise every parameter of one of our networks."""
  if isinstance(module, autoencoder.AutoencoderKL):
    s = 2 ** (len(module.channels) - 1)
    x = jnp.zeros((1,) + (s,) * module.spatial_dims + (module.in_channels,))
    return (x, jax.random.key(0)), {}
  if isinstance(module, unet.DiffusionModelUNet):
    s = 2 ** (len(module.channels) - 1)
    x = jnp.zeros((1,) + (s,) * module.spatial_dims + (module.in_channels,))
    kw = {}
    if module.with_conditioning:
      kw["context"] = jnp.zeros((1, 1, module.cross_attention_dim))
    if module.num_class_embeds is not None:
      kw["class_labels"] = jnp.zeros((1,), jnp.int32)
    return (x, jnp.zeros((1,), jnp.int32)), kw
  if isinstance(module, discriminator.PatchDiscriminator):
    s = 2 ** (module.num_layers_d + 2)
    x = jnp.zeros((1,) + (s,) * module.spatial_dims + (module.in_channels,))
    return (x,), {}
  raise TypeError(f"no example inputs for {type(module).__name__}")


# Initialisation runs once and is mostly threefry draws, one per parameter: compiled without LLVM
# optimisation it compiles 2x faster (the test UNet on CPU: 26 s -> 12 s). The draws are the same;
# their scaling to the init range may round differently in the last bit (no FMA contraction).
ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def init_variables(module: nn.Module, key: jax.Array) -> dict:
  """Freshly initialised variables ({"params": ...[, "batch_stats": ...]}) of one of our networks."""
  args, kwargs = example_inputs(module)
  # Jitted: one compilation instead of hundreds of eagerly dispatched initialiser ops.
  init = jax.jit(lambda k: module.init({"params": k}, *args, **kwargs))
  return flax.core.unfreeze(init.lower(key).compile(compiler_options=ONCE_COMPILER_OPTIONS)(key))


def abstract_variables(module: nn.Module) -> dict:
  """Variable shapes/dtypes (jax.ShapeDtypeStruct) without allocating or computing anything."""
  args, kwargs = example_inputs(module)
  return jax.eval_shape(lambda k: flax.core.unfreeze(module.init({"params": k}, *args, **kwargs)),
                        jax.random.key(0))


def monai_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
  """MONAI-core state-dict key -> shape, for every variable of one of our networks.

  Nothing is allocated or computed, so a paper-size network can be checked against a MONAI model
  built on torch's "meta" device (e.g. the published bundle's exact configuration).
  """
  kind = kind_of(module)
  flat = _flat(abstract_variables(module))
  return {key: _monai_shape(tuple(flat[path].shape), path[-1])
          for path, key in _keys_for(flat, kind).items()}


def kind_of(module: nn.Module) -> str:
  for cls, kind in ((autoencoder.AutoencoderKL, "autoencoder"), (unet.DiffusionModelUNet, "unet"),
                    (discriminator.PatchDiscriminator, "discriminator")):
    if isinstance(module, cls):
      return kind
  raise TypeError(f"not one of our networks: {type(module).__name__}")


def _is_variables(tree: Mapping) -> bool:
  return "params" in tree and isinstance(tree["params"], Mapping)


def monai_to_flax(state_dict: Mapping[str, Any], kind: str, module_or_template: Any) -> dict:
  """MONAI state dict (name -> torch tensor / array; core or GenerativeModels names) -> Flax.

  `module_or_template` is one of our modules (returns variables {"params": ...} plus
  "batch_stats" for the discriminator, ready for `module.apply`) or a pytree of arrays /
  ShapeDtypeStructs (variables or bare params; the result has the same structure).
  Raises ValueError naming missing / unexpected keys and shape mismatches.
  """
  _check_kind(kind)
  if isinstance(module_or_template, nn.Module):
    template = abstract_variables(module_or_template)
  else:
    template = module_or_template
  wrapped = not _is_variables(template)
  if wrapped:
    template = {"params": template}
  flat = _flat(template)
  keys = _keys_for(flat, kind)
  sd = _normalise_state_dict(state_dict)
  used, missing, mismatched, out = set(), [], [], {}
  for path, key in keys.items():
    name = key if key in sd else next((c for c in _legacy_names(key) if c in sd), None)
    if name is None:
      missing.append(key)
      continue
    used.add(name)
    a = _to_flax_layout(sd[name], path[-1])
    want = tuple(flat[path].shape)
    if a.shape != want:
      mismatched.append(f"{name}: file {tuple(sd[name].shape)} -> {a.shape}, model wants {want}")
      continue
    out[path] = jnp.asarray(a, dtype=flat[path].dtype)
  unexpected = sorted(set(sd) - used)
  if missing or unexpected or mismatched:
    lines = [f"MONAI {kind} state dict does not match the model:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
      if items:
        more = f" (+{len(items) - 12} more)" if len(items) > 12 else ""
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:12]) + more)
    lines.append("  Check that the config section (channels, num_res_blocks, attention_levels, "
                 "...) matches the checkpoint's network.")
    raise ValueError("\n".join(lines))
  variables = flax.traverse_util.unflatten_dict(out)
  return variables["params"] if wrapped else variables


def flax_to_monai(variables: Mapping, kind: str) -> dict[str, np.ndarray]:
  """Flax variables (or bare params) -> MONAI-core state dict of numpy arrays.

  Load it into MONAI with `model.load_state_dict({k: torch.from_numpy(v) ...}, strict=True)`.
  The discriminator needs its "batch_stats" too (pass the variables dict).
  """
  _check_kind(kind)
  tree = variables if _is_variables(variables) else {"params": variables}
  if kind == "discriminator" and "batch_stats" not in tree and _has_batchnorm(tree["params"]):
    raise ValueError("flax_to_monai(kind='discriminator'): pass the variables dict with "
                     "'batch_stats' (BatchNorm running statistics), not bare params")
  flat = _flat(tree)
  out = {}
  for path, key in _keys_for(flat, kind).items():
    a = np.asarray(flat[path])
    if path[-1] == "num_batches_tracked":
      a = a.astype(np.int64)
    elif a.dtype != np.float32 and np.issubdtype(a.dtype, np.floating):
      a = a.astype(np.float32)
    out[key] = np.array(_to_monai_layout(a, path[-1]), order="C", copy=True)  # writable
  return out


def _has_batchnorm(params: Mapping) -> bool:
  return any("adn_N" in p and p[-1] == "scale" for p in _flat(params))


def _unwrap(obj: Any, path: str) -> Mapping[str, Any]:
  for wrapper in ("state_dict", "model", "model_state_dict", "network", "net"):
    if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
      return _unwrap(obj[wrapper], path)
  if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
    raise ValueError(f"{path}: not a state dict (name -> tensor); found {type(obj).__name__}")
  return obj


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Read a state dict (name -> numpy array) from .pt/.pth/.ckpt/.bin, .safetensors or .npz.

  PyTorch files go through `torch.load(map_location="cpu", weights_only=True)` (tensors and plain
  containers only, never arbitrary unpickling); common wrappers such as {"state_dict": ...} or
  {"model": ...} and a DataParallel `module.` prefix are removed.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"weights file {path!r} does not exist")
  ext = os.path.splitext(path)[1].lower()
  if ext in (".pt", ".pth", ".ckpt", ".bin"):
    import torch  # pylint: disable=g-import-not-at-top  # only needed for PyTorch files

    obj = torch.load(path, map_location="cpu", weights_only=True)
  elif ext == ".safetensors":
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"{path}: reading .safetensors needs the `safetensors` package") from e
    obj = load_file(path)
  elif ext == ".npz":
    with np.load(path, allow_pickle=False) as z:
      obj = {k: z[k] for k in z.files}
  else:
    raise ValueError(f"{path}: unknown weights format {ext!r}; use .pt/.pth, .safetensors or .npz")
  return _normalise_state_dict(_unwrap(obj, path))


def save_npz(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Write a state dict (e.g. from `flax_to_monai`) as .npz, loadable by `load_state_dict`."""
  np.savez(path, **_normalise_state_dict(state_dict))
