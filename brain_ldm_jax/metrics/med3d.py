"""Med3D / MedicalNet 3D ResNets (Chen et al. 2019) in Flax, for FID features.

Architecture as in Tencent/MedicalNet `models/resnet.py` (shortcut type B, the variant the
published checkpoints load into): conv1 7^3 stride 2 pad 3 (1 -> 64), BN, ReLU, max-pool 3^3
stride 2 pad 1; layer1 (64), layer2 (128, stride 2), layer3 (256, dilation 2), layer4 (512,
dilation 4); BasicBlock (ResNet-10/18/34) or Bottleneck x4 (ResNet-50/101/152/200); projection
shortcut (1^3 conv stride s + BN) where shape changes. BatchNorm in inference mode, eps 1e-5.
Features = global average of layer4's output, i.e. the input of the segmentation head, which is
not ported (its checkpoint keys `conv_seg.*` are ignored). Channels last: (B, x, y, z, 1).

All convolutions go through `brain_ldm_jax.nn.ops.conv`, the networks' seam (the dilated 3^3
convolutions of layer3/4 included: it rewrites them exactly as "space to batch").

Weights: the published PyTorch checkpoints (MedicalNet release, e.g. `pretrain/resnet_10_23dataset.pth`,
`resnet_50_23dataset.pth`; also mirrored by Warvito/MedicalNet-models) are read with
`torch.load(path, map_location="cpu", weights_only=True)`; `{"state_dict": ...}` wrappers and the
DataParallel `module.` prefix are handled. There is no download here: without a weights file,
FID is refused with a `ConfigError` that says where to get one.
"""

from __future__ import annotations

import functools
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from brain_ldm_jax.errors import ConfigError, DataError
from brain_ldm_jax.metrics.fid import FeatureExtractor
from brain_ldm_jax.nn import ops

# depth -> (block, blocks per layer)
ARCHS = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}

WEIGHTS_HELP = (
    "Med3D-FID needs the MedicalNet weights, which are not bundled and are not downloaded "
    "automatically. Download a checkpoint from the MedicalNet release (github.com/Tencent/MedicalNet, "
    "'pretrain/resnet_10_23dataset.pth', 'resnet_50_23dataset.pth', ...; Pinaya et al. used Med3D "
    "features) and set {field} to its path, with the matching depth (10, 18, 34, 50, ...). "
    "To evaluate without them, pass an explicitly named alternative FeatureExtractor; its name is "
    "recorded with every FID it produces.")


class Conv3D(nn.Module):
  """Bias-free 3D convolution with PyTorch-style symmetric padding, via `ops.conv`."""
  features: int
  kernel_size: int
  stride: int = 1
  dilation: int = 1

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k, k, k, x.shape[-1], self.features), jnp.float32)
    p = self.dilation * (k - 1) // 2
    return ops.conv(x, kernel, strides=(self.stride,) * 3, padding=[(p, p)] * 3,
                    dilation=self.dilation)


def _bn(name):
  return nn.BatchNorm(use_running_average=True, epsilon=1e-5, momentum=0.9, name=name)


class Block(nn.Module):
  """BasicBlock or Bottleneck with optional projection shortcut (names match PyTorch)."""
  kind: str
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False

  @nn.compact
  def __call__(self, x):
    conv = Conv3D
    if self.kind == "basic":
      out = nn.relu(_bn("bn1")(conv(self.planes, 3, self.stride, self.dilation, name="conv1")(x)))
      out = _bn("bn2")(conv(self.planes, 3, 1, self.dilation, name="conv2")(out))
      expansion = 1
    else:
      out = nn.relu(_bn("bn1")(conv(self.planes, 1, name="conv1")(x)))
      out = nn.relu(_bn("bn2")(conv(self.planes, 3, self.stride, self.dilation, name="conv2")(out)))
      out = _bn("bn3")(conv(self.planes * 4, 1, name="conv3")(out))
      expansion = 4
    if self.downsample:
      x = _bn("downsample_1")(conv(self.planes * expansion, 1, self.stride, name="downsample_0")(x))
    return nn.relu(out + x)


class Med3DResNet(nn.Module):
  """MedicalNet ResNet trunk; globally average-pooled layer4 features (B, 512 * exp).

  With `pool=False` it returns the layer4 feature map itself (for the perceptual loss).
  """
  depth: int = 10
  pool: bool = True

  @nn.compact
  def __call__(self, x):
    if self.depth not in ARCHS:
      raise ConfigError(f"Med3D depth {self.depth} unknown; choose one of {sorted(ARCHS)}")
    kind, layers = ARCHS[self.depth]
    expansion = 1 if kind == "basic" else 4
    if x.ndim == 4:
      x = x[..., None]
    x = Conv3D(64, 7, 2, name="conv1")(x.astype(jnp.float32))
    x = nn.relu(_bn("bn1")(x))
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 3, 1), (1, 2, 2, 2, 1),
                              [(0, 0), (1, 1), (1, 1), (1, 1), (0, 0)])
    inplanes = 64
    for li, (planes, n, stride, dil) in enumerate(zip((64, 128, 256, 512), layers, (1, 2, 1, 1),
                                                       (1, 1, 2, 4))):
      for bi in range(n):
        s = stride if bi == 0 else 1
        down = bi == 0 and (s != 1 or inplanes != planes * expansion)
        x = Block(kind, planes, s, dil, down, name=f"layer{li + 1}_{bi}")(x)
        inplanes = planes * expansion
    return x.mean(axis=(1, 2, 3)) if self.pool else x


# ---------------------------------------------------------------------------------------------
# PyTorch checkpoint -> Flax variables.

def _flax_path(key: str) -> tuple[tuple[str, ...], str]:
  """'layer1.0.downsample.1.running_mean' -> (('layer1_0', 'downsample_1'), 'running_mean')."""
  parts = key.split(".")
  mods, i = [], 0
  while i < len(parts) - 1:
    if (re.fullmatch(r"layer\d+", parts[i]) or parts[i] == "downsample") and i + 1 < len(parts) - 1:
      mods.append(f"{parts[i]}_{parts[i + 1]}")
      i += 2
    else:
      mods.append(parts[i])
      i += 1
  return tuple(mods), parts[-1]


def _strip_state_dict(obj, path: str) -> dict[str, np.ndarray]:
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise DataError(f"{path}: not a MedicalNet checkpoint (expected a state dict, got {type(obj)})")
  out = {}
  for k, v in obj.items():
    k = k[len("module."):] if k.startswith("module.") else k
    if k.startswith("conv_seg") or k.endswith("num_batches_tracked"):
      continue
    out[k] = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, np.float32)
  return out


def infer_depth(state: dict[str, np.ndarray]) -> int:
  """Depth from a stripped state dict: block counts per layer and Bottleneck (has conv3)."""
  counts = []
  for li in range(1, 5):
    idx = {int(m.group(1)) for k in state if (m := re.match(rf"layer{li}\.(\d+)\.", k))}
    counts.append(max(idx) + 1 if idx else 0)
  kind = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
  for depth, arch in ARCHS.items():
    if arch == (kind, tuple(counts)):
      return depth
  raise DataError(f"checkpoint has {kind} blocks {counts} per layer: not a MedicalNet ResNet")


def convert_state_dict(state: dict[str, np.ndarray], module: Med3DResNet, path: str = "checkpoint"):
  """Map a stripped PyTorch state dict onto `module`'s variables; check names and shapes."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16, 16, 16, 1)))
  variables = {"params": {}, "batch_stats": {}}
  leaf_map = {"weight": None, "bias": ("params", "bias"), "running_mean": ("batch_stats", "mean"),
              "running_var": ("batch_stats", "var")}
  for key, v in state.items():
    mods, leaf = _flax_path(key)
    if leaf not in leaf_map:
      raise DataError(f"{path}: unexpected tensor {key!r}")
    if leaf == "weight":
      if v.ndim == 5:  # conv (O, I, kx, ky, kz) -> (kx, ky, kz, I, O)
        col, name, v = "params", "kernel", v.transpose(2, 3, 4, 1, 0)
      else:  # BatchNorm weight
        col, name = "params", "scale"
    else:
      col, name = leaf_map[leaf]
    node = variables[col]
    for m in mods:
      node = node.setdefault(m, {})
    node[name] = jnp.asarray(v)

  flat_expected = {k: s.shape for k, s in _flatten(shapes).items()}
  flat_got = {k: a.shape for k, a in _flatten(variables).items()}
  missing = sorted(set(flat_expected) - set(flat_got))
  extra = sorted(set(flat_got) - set(flat_expected))
  wrong = sorted(k for k in set(flat_got) & set(flat_expected) if flat_got[k] != flat_expected[k])
  if missing or extra or wrong:
    hint = (" (missing projection shortcuts: a shortcut-type-A checkpoint, which is not supported)"
            if any("downsample" in "/".join(k) for k in missing) else "")
    raise DataError(
        f"{path}: does not match Med3D ResNet-{module.depth}{hint}: "
        f"missing {['/'.join(k) for k in missing[:5]]}, unexpected {['/'.join(k) for k in extra[:5]]}, "
        f"wrong shape {['/'.join(k) for k in wrong[:5]]}")
  return variables


def _flatten(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def require_weights(path: str | None, field: str = "the evaluation config's Med3D weights field"):
  """Raise a ConfigError with download instructions unless `path` is an existing file."""
  if not path:
    raise ConfigError(WEIGHTS_HELP.format(field=field))
  if not os.path.isfile(path):
    raise ConfigError(f"Med3D weights file {path!r} does not exist. " + WEIGHTS_HELP.format(field=field))


def load_med3d(path: str | None, depth: int | None = None,
               field: str = "the evaluation config's Med3D weights field"):
  """Load a MedicalNet `.pth` into (Med3DResNet module, variables); depth inferred if None."""
  require_weights(path, field)
  import torch  # pylint: disable=import-outside-toplevel  (only needed to read .pth files)
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 -- any unreadable file is the user's to fix
    raise DataError(f"{path}: cannot read as a PyTorch checkpoint ({e})") from e
  state = _strip_state_dict(obj, path)
  found = infer_depth(state)
  if depth is not None and depth != found:
    raise DataError(f"{path}: holds a ResNet-{found}, but depth {depth} was requested")
  module = Med3DResNet(depth=found)
  return module, convert_state_dict(state, module, path)


def normalize_volumes(x: jax.Array, mode: str) -> jax.Array:
  """'zscore': per-volume (x - mean) / std over all voxels; 'none': unchanged.

  MedicalNet was trained on z-scored volumes; MONAI's MedicalNet perceptual loss z-scores each
  volume the same way, so that is the default here.
  """
  if mode == "none":
    return x
  if mode == "zscore":
    axes = tuple(range(1, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    std = x.std(axis=axes, keepdims=True)
    return (x - mean) / jnp.maximum(std, 1e-8)
  raise ConfigError(f"Med3D normalisation {mode!r} unknown; use 'zscore' or 'none'")


@functools.partial(jax.jit, static_argnames=("module", "normalize"))
def _features(module, variables, x, normalize):
  if x.ndim == 4:
    x = x[..., None]
  return module.apply(variables, normalize_volumes(x.astype(jnp.float32), normalize))


def med3d_features(module: Med3DResNet, variables, volumes, batch_size: int = 4,
                   normalize: str = "zscore") -> np.ndarray:
  """Features (N, F) of volumes (N, x, y, z[, 1]) in fixed-size jitted batches (last one padded)."""
  out = []
  n = len(volumes)
  for s in range(0, n, batch_size):
    chunk = np.asarray(volumes[s:s + batch_size], np.float32)
    k = len(chunk)
    if k < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - k, axis=0)])
    out.append(np.asarray(_features(module, variables, jnp.asarray(chunk), normalize))[:k])
  return np.concatenate(out)


def med3d_extractor(path: str | None, depth: int | None = None, batch_size: int = 4,
                    normalize: str = "zscore",
                    field: str = "the evaluation config's Med3D weights field") -> FeatureExtractor:
  """A FeatureExtractor named 'med3d_resnet{depth}:{file name}:{normalize}'."""
  module, variables = load_med3d(path, depth, field=field)
  name = f"med3d_resnet{module.depth}:{os.path.basename(path)}:{normalize}"
  return FeatureExtractor(
      name=name, batch_size=batch_size,
      fn=lambda v: med3d_features(module, variables, v, batch_size, normalize))


__all__ = ["ARCHS", "Med3DResNet", "convert_state_dict", "infer_depth", "load_med3d",
           "med3d_extractor", "med3d_features", "normalize_volumes", "require_weights"]
