"""KL autoencoder (MONAI `AutoencoderKL`), channels last, generic over 2D and 3D.

Submodule names mirror MONAI's state-dict names (`encoder.blocks.{i}` -> `encoder/blocks_{i}`),
so `convert.py` maps weights mechanically.

MONAI's `encode` returns (z_mu, z_sigma) with z_sigma = exp(clamp(log_var, -30, 20) / 2) and its
`forward` returns (reconstruction, z_mu, z_sigma). Here `encode` returns (mean, logvar) with the
same clamp, i.e. `z_sigma == exp(logvar / 2)`, and `__call__` returns (reconstruction, mean,
logvar); the KL term is then 0.5 * sum(mean² + exp(logvar) - logvar - 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from brain_ldm_jax.nn import layers

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def sample_latent(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
  """Reparameterised sample z = mean + exp(logvar / 2) * eps, eps ~ N(0, I) (MONAI `sampling`)."""
  eps = jax.random.normal(key, mean.shape, jnp.float32)
  return (mean + jnp.exp(0.5 * logvar) * eps).astype(mean.dtype)


def _per_level(value: int | Sequence[int], n: int) -> tuple[int, ...]:
  return (value,) * n if isinstance(value, int) else tuple(value)


class AEResBlock(nn.Module):
  """MONAI AEKLResBlock: (GroupNorm, SiLU, conv3) ×2 plus a 1³ `nin_shortcut` if channels change."""
  out_channels: int
  norm_num_groups: int
  norm_eps: float
  dtype: layers.Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda f, k, name: layers.Conv(f, k, padding=k // 2, dtype=self.dtype,  # noqa: E731
                                          impl=self.conv_impl, name=name)
    norm_silu = lambda name: layers.GroupNorm(self.norm_num_groups, self.norm_eps,  # noqa: E731
                                              silu=True, dtype=self.dtype, name=name)
    h = conv(self.out_channels, 3, "conv1")(norm_silu("norm1")(x))
    h = conv(self.out_channels, 3, "conv2")(norm_silu("norm2")(h))
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, "nin_shortcut")(x)
    return x.astype(h.dtype) + h


class Downsample(nn.Module):
  """MONAI AEKLDownsample: pad (0, 1) per axis, then a stride-2 3³ conv without padding."""
  dtype: layers.Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    nd = x.ndim - 2
    return layers.Conv(x.shape[-1], 3, strides=2, padding=((0, 1),) * nd, dtype=self.dtype,
                       impl=self.conv_impl, name="conv")(x)


class Upsample(nn.Module):
  """MONAI Upsample(nontrainable, nearest ×2) followed by its 3³ `postconv`."""
  dtype: layers.Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.Conv(x.shape[-1], 3, padding=1, dtype=self.dtype, impl=self.conv_impl,
                       upsample=True, name="postconv")(x)


class Encoder(nn.Module):
  """MONAI Encoder: conv, levels of res blocks (+attention) and downsamples, optional non-local
  block, GroupNorm (no SiLU after it, as MONAI), conv to `out_channels`."""
  channels: tuple[int, ...]
  out_channels: int
  num_res_blocks: tuple[int, ...]
  norm_num_groups: int
  norm_eps: float
  attention_levels: tuple[bool, ...]
  with_nonlocal_attn: bool = True
  remat: bool = False
  dtype: layers.Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    res_block = layers.remat(AEResBlock) if self.remat else AEResBlock
    kw = dict(dtype=self.dtype)
    i = 0

    def name():
      nonlocal i
      i += 1
      return f"blocks_{i - 1}"

    def res(h, ch):
      return res_block(ch, self.norm_num_groups, self.norm_eps, conv_impl=self.conv_impl,
                       name=name(), **kw)(h)

    def attn(h):
      return layers.SpatialAttentionBlock(self.norm_num_groups, self.norm_eps, name=name(),
                                          **kw)(h)

    h = layers.Conv(self.channels[0], 3, padding=1, impl=self.conv_impl, name=name(), **kw)(x)
    for level, ch in enumerate(self.channels):
      for _ in range(self.num_res_blocks[level]):
        h = res(h, ch)
        if self.attention_levels[level]:
          h = attn(h)
      if level != len(self.channels) - 1:
        h = Downsample(conv_impl=self.conv_impl, name=name(), **kw)(h)
    if self.with_nonlocal_attn:
      h = attn(res(h, self.channels[-1]))
      h = res(h, self.channels[-1])
    h = layers.GroupNorm(self.norm_num_groups, self.norm_eps, name=name(), **kw)(h)
    return layers.Conv(self.out_channels, 3, padding=1, impl=self.conv_impl, name=name(), **kw)(h)


class Decoder(nn.Module):
  """MONAI Decoder: the encoder mirrored, nearest ×2 + conv upsampling, GroupNorm, conv."""
  channels: tuple[int, ...]
  out_channels: int
  num_res_blocks: tuple[int, ...]
  norm_num_groups: int
  norm_eps: float
  attention_levels: tuple[bool, ...]
  with_nonlocal_attn: bool = True
  remat: bool = False
  dtype: layers.Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    res_block = layers.remat(AEResBlock) if self.remat else AEResBlock
    kw = dict(dtype=self.dtype)
    i = 0

    def name():
      nonlocal i
      i += 1
      return f"blocks_{i - 1}"

    def res(h, ch):
      return res_block(ch, self.norm_num_groups, self.norm_eps, conv_impl=self.conv_impl,
                       name=name(), **kw)(h)

    def attn(h):
      return layers.SpatialAttentionBlock(self.norm_num_groups, self.norm_eps, name=name(),
                                          **kw)(h)

    rev_ch = tuple(reversed(self.channels))
    rev_attn = tuple(reversed(self.attention_levels))
    rev_nres = tuple(reversed(self.num_res_blocks))
    h = layers.Conv(rev_ch[0], 3, padding=1, impl=self.conv_impl, name=name(), **kw)(z)
    if self.with_nonlocal_attn:
      h = attn(res(h, rev_ch[0]))
      h = res(h, rev_ch[0])
    for level, ch in enumerate(rev_ch):
      for _ in range(rev_nres[level]):
        h = res(h, ch)
        if rev_attn[level]:
          h = attn(h)
      if level != len(rev_ch) - 1:
        h = Upsample(conv_impl=self.conv_impl, name=name(), **kw)(h)
    h = layers.GroupNorm(self.norm_num_groups, self.norm_eps, name=name(), **kw)(h)
    return layers.Conv(self.out_channels, 3, padding=1, impl=self.conv_impl, name=name(), **kw)(h)


class AutoencoderKL(nn.Module):
  """MONAI AutoencoderKL (Rombach et al. 2022; Pinaya et al. 2022). Fields = MONAI's arguments.

  Methods: `encode(x) -> (mean, logvar)`, `decode(z) -> x`, `__call__(x, key) -> (recon, mean,
  logvar)` with a reparameterised sample. Inputs/outputs are float32 (B, *spatial, C); `dtype` is
  the compute dtype, `remat` recomputes res blocks in the backward pass to save memory.
  """
  spatial_dims: int
  in_channels: int = 1
  out_channels: int = 1
  channels: Sequence[int] = (32, 64, 64, 64)
  num_res_blocks: int | Sequence[int] = (2, 2, 2, 2)
  attention_levels: Sequence[bool] = (False, False, True, True)
  latent_channels: int = 3
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  with_encoder_nonlocal_attn: bool = True
  with_decoder_nonlocal_attn: bool = True
  remat: bool = False
  dtype: str = "float32"
  conv_impl: str = "auto"

  def setup(self):
    # setup (not compact): encode/decode/__call__ share the submodules.
    channels = tuple(self.channels)
    if any(c % self.norm_num_groups for c in channels):
      raise ValueError(f"AutoencoderKL: channels {channels} must be multiples of "
                       f"norm_num_groups={self.norm_num_groups}")
    if len(self.attention_levels) != len(channels):
      raise ValueError("AutoencoderKL: attention_levels must have one entry per channels level")
    nres = _per_level(self.num_res_blocks, len(channels))
    if len(nres) != len(channels):
      raise ValueError("AutoencoderKL: num_res_blocks must be an int or one per channels level")
    dtype = layers.as_dtype(self.dtype)
    common = dict(channels=channels, num_res_blocks=nres, norm_num_groups=self.norm_num_groups,
                  norm_eps=self.norm_eps, attention_levels=tuple(self.attention_levels),
                  remat=self.remat, dtype=dtype, conv_impl=self.conv_impl)
    self.encoder = Encoder(out_channels=self.latent_channels,
                           with_nonlocal_attn=self.with_encoder_nonlocal_attn, **common)
    self.decoder = Decoder(out_channels=self.out_channels,
                           with_nonlocal_attn=self.with_decoder_nonlocal_attn, **common)
    conv1 = lambda name: layers.Conv(self.latent_channels, 1, dtype=dtype,  # noqa: E731
                                     impl=self.conv_impl, name=name)
    self.quant_conv_mu = conv1("quant_conv_mu")
    self.quant_conv_log_sigma = conv1("quant_conv_log_sigma")
    self.post_quant_conv = conv1("post_quant_conv")

  def _check(self, x: jax.Array, channels: int, what: str):
    if x.ndim != self.spatial_dims + 2 or x.shape[-1] != channels:
      raise ValueError(f"AutoencoderKL.{what}: expected (batch, *{self.spatial_dims} spatial, "
                       f"{channels}) channels-last, got shape {x.shape}")

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Image -> (mean, logvar) of the latent posterior; logvar clamped to [-30, 20] as MONAI."""
    self._check(x, self.in_channels, "encode")
    h = self.encoder(x)
    mean = self.quant_conv_mu(h).astype(jnp.float32)
    logvar = self.quant_conv_log_sigma(h).astype(jnp.float32)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, z: jax.Array) -> jax.Array:
    """Latent -> image (float32)."""
    self._check(z, self.latent_channels, "decode")
    return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

  def __call__(self, x: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(reconstruction of a posterior sample, mean, logvar); MONAI's forward with logvar."""
    mean, logvar = self.encode(x)
    return self.decode(sample_latent(mean, logvar, key)), mean, logvar


def build_autoencoder(cfg) -> AutoencoderKL:
  """AutoencoderKL from a config section (e.g. `presets.base_config(p).autoencoder`)."""
  return AutoencoderKL(**layers.module_kwargs(AutoencoderKL, cfg, "autoencoder"))
