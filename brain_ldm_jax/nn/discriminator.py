"""Patch-GAN discriminator (MONAI `PatchDiscriminator`), channels last.

Layers: `initial_conv` (conv with bias + activation), `layers_{i}` for MONAI's `{i}` (conv without
bias + norm + activation; stride 2 except the last), `final_conv` (conv with bias). Like MONAI,
`__call__` returns the list of every layer's output; the last element is the patch logits.

Batch statistics in a pure train step: the default norm is PyTorch-style BatchNorm (see
`layers.BatchNorm`). Call with `use_running_average=False` and `mutable=["batch_stats"]` while
training (normalise with the batch, get updated running statistics back as the second result of
`apply`) and with `use_running_average=True` for evaluation:

    outs, updates = disc.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    variables = {"params": params, "batch_stats": updates["batch_stats"]}
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from brain_ldm_jax.nn import layers

NORMS = ("BATCH", "INSTANCE", "NONE")
ACTIVATIONS = ("LEAKYRELU", "RELU", "SILU", "GELU")


def _activation(name: str, negative_slope: float, x: jax.Array) -> jax.Array:
  name = name.upper()
  if name == "NONE":
    return x
  if name == "LEAKYRELU":
    return nn.leaky_relu(x, negative_slope)
  if name == "RELU":
    return nn.relu(x)
  if name == "SILU":
    return nn.silu(x)
  if name == "GELU":
    return nn.gelu(x, approximate=False)
  raise ValueError(f"PatchDiscriminator: activation {name!r} unknown; choose from {ACTIVATIONS}")


class _ConvNormAct(nn.Module):
  """MONAI Convolution with ADN ordering "NDA": conv -> norm -> (dropout 0) -> activation."""
  features: int
  kernel_size: int
  strides: int
  padding: int
  use_bias: bool
  norm: str
  activation: str
  negative_slope: float
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    # MONAI's normal_init: conv weights N(0, 0.02), biases 0, BatchNorm weights N(1, 0.02).
    h = layers.Conv(self.features, self.kernel_size, self.strides, self.padding,
                    use_bias=self.use_bias, kernel_init=nn.initializers.normal(0.02),
                    dtype=self.dtype, name="conv")(x)
    norm = self.norm.upper()
    if norm == "BATCH":
      h = layers.BatchNorm(scale_init=lambda k, s, d=jnp.float32: 1.0 + 0.02 * jax.random.normal(
          k, s, d), dtype=self.dtype, name="adn_N")(h, use_running_average)
    elif norm == "INSTANCE":
      # torch InstanceNorm (MONAI default: affine=False, no running stats, eps 1e-5).
      h = layers.GroupNorm(h.shape[-1], 1e-5, affine=False, dtype=self.dtype, name="adn_N")(h)
    elif norm != "NONE":
      raise ValueError(f"PatchDiscriminator: norm {self.norm!r} unknown; choose from {NORMS}")
    return _activation(self.activation, self.negative_slope, h)


class PatchDiscriminator(nn.Module):
  """MONAI PatchDiscriminator. `activation` is the MONAI activation name (its slope argument is
  `negative_slope`); `norm` is "BATCH" (MONAI's default), "INSTANCE" or "NONE"."""
  spatial_dims: int
  channels: int
  in_channels: int
  out_channels: int = 1
  num_layers_d: int = 3
  kernel_size: int = 4
  activation: str = "LEAKYRELU"
  negative_slope: float = 0.2
  norm: str = "BATCH"
  bias: bool = False
  padding: int = 1
  dropout: float = 0.0
  last_conv_kernel_size: int | None = None
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool = True) -> list[jax.Array]:
    if self.dropout:
      raise NotImplementedError("PatchDiscriminator: dropout > 0 is not supported")
    if x.ndim != self.spatial_dims + 2 or x.shape[-1] != self.in_channels:
      raise ValueError(f"PatchDiscriminator: expected (batch, *{self.spatial_dims} spatial, "
                       f"{self.in_channels}) channels-last, got shape {x.shape}")
    dtype = layers.as_dtype(self.dtype)
    act = dict(activation=self.activation, negative_slope=self.negative_slope, dtype=dtype)
    outs = []
    h = _ConvNormAct(self.channels, self.kernel_size, 2, self.padding, True, "NONE",
                     name="initial_conv", **act)(x, use_running_average)
    outs.append(h)
    ch = self.channels
    for i in range(self.num_layers_d):
      ch *= 2
      stride = 1 if i == self.num_layers_d - 1 else 2
      h = _ConvNormAct(ch, self.kernel_size, stride, self.padding, self.bias, self.norm,
                       name=f"layers_{i}", **act)(h, use_running_average)
      outs.append(h)
    k = self.last_conv_kernel_size or self.kernel_size
    h = _ConvNormAct(self.out_channels, k, 1, (k - 1) // 2, True, "NONE", "NONE", 0.0, dtype=dtype,
                     name="final_conv")(h, use_running_average)
    outs.append(h)
    return [o.astype(jnp.float32) for o in outs]


def build_discriminator(cfg) -> PatchDiscriminator:
  """PatchDiscriminator from a config section (e.g. `presets.base_config(p).discriminator`).

  MONAI-style tuples are accepted: activation=("LEAKYRELU", {"negative_slope": 0.2}), norm=("BATCH",
  {}) (norm arguments other than the name are not supported).
  """
  kwargs = layers.module_kwargs(PatchDiscriminator, cfg, "discriminator")
  act = kwargs.get("activation")
  if isinstance(act, tuple):
    name, args = act
    kwargs["activation"] = name
    if "negative_slope" in dict(args):
      kwargs["negative_slope"] = float(dict(args)["negative_slope"])
  norm = kwargs.get("norm")
  if isinstance(norm, tuple):
    kwargs["norm"] = norm[0]
  return PatchDiscriminator(**kwargs)
