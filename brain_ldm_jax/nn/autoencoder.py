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
from brain_ldm_jax.nn import ops

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def sample_latent(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
  """Reparameterised sample z = mean + exp(logvar / 2) * eps, eps ~ N(0, I) (MONAI `sampling`)."""
  eps = jax.random.normal(key, mean.shape, jnp.float32)
  return (mean + jnp.exp(0.5 * logvar) * eps).astype(mean.dtype)


def _per_level(value: int | Sequence[int], n: int) -> tuple[int, ...]:
  return (value,) * n if isinstance(value, int) else tuple(value)


class AEResBlock(nn.Module):
  """MONAI AEKLResBlock: (GroupNorm, SiLU, conv3) ×2 plus a 1³ `nin_shortcut` if channels change.

  Under `layers.remat` its backward pass is `_res_block_remat_vjp`, ordered for memory.
  """
  in_channels: int
  out_channels: int
  norm_num_groups: int
  norm_eps: float
  dtype: layers.Dtype = jnp.float32

  def setup(self):
    conv = lambda f, k: layers.Conv(f, k, padding=k // 2, dtype=self.dtype)  # noqa: E731
    norm_silu = lambda: layers.GroupNorm(self.norm_num_groups, self.norm_eps,  # noqa: E731
                                         silu=True, dtype=self.dtype)
    self.norm1, self.conv1 = norm_silu(), conv(self.out_channels, 3)
    self.norm2, self.conv2 = norm_silu(), conv(self.out_channels, 3)
    if self.in_channels != self.out_channels:
      self.nin_shortcut = conv(self.out_channels, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.in_channels:
      raise ValueError(f"AEResBlock: expected {self.in_channels} input channels, got {x.shape}")
    h = self.conv2(self.norm2(self.conv1(self.norm1(x))))
    return self._shortcut(x).astype(h.dtype) + h

  def _shortcut(self, x):
    return self.nin_shortcut(x) if self.in_channels != self.out_channels else x

  @staticmethod
  def remat_vjp(block, variables, args, ct):
    return _res_block_remat_vjp(block, variables["params"], *args, ct)


def _res_block_remat_vjp(block: AEResBlock, params, x, ct):
  """Recomputation and backward pass of a remat'ed AEResBlock, ordered for a low memory peak.

  Left to XLA's scheduler, the generic recomputation kept the first norm's output, the shortcut's
  input gradient and the input at once (at the paper autoencoder's first decoder block at full
  resolution, 128 channels, each twice the size of the block's output), and that block set the
  memory peak of the whole train step. Here each step is tied (`ops.after`, through the
  parameters, which are small) to the cotangent it follows, so nothing is computed before it is
  needed: the first norm's output is recomputed twice, for conv1's forward pass and again for its
  kernel gradient, and the shortcut's input gradient comes last.
  """
  def layer(name, p, h):
    return block.apply({"params": {name: p}}, h, method=lambda m, h: getattr(m, name)(h))

  def vjp(name, p, h, cotangent, split=False):
    """(d params, d input) of sublayer `name`, computed once `cotangent` exists. `split`: the
    input gradient only after the parameter gradient (which frees `h` first)."""
    p_late = ops.after(p, cotangent)
    if not split:
      return jax.vjp(lambda q, g: layer(name, q, g), p_late, h)[1](cotangent)
    (dp,) = jax.vjp(lambda q: layer(name, q, h), p_late)[1](cotangent)
    (dh,) = jax.vjp(lambda g: layer(name, ops.after(p, dp), g), h)[1](cotangent)
    return dp, dh

  p = params
  # In memory once: computed inside its consumers, the cotangent (often the next block's input
  # gradient, a fusion) would keep that block's tensors alive through this whole backward pass.
  ct = ops.in_memory(ct.astype(block.dtype))
  grads = {}
  c1 = layer("conv1", p["conv1"], layer("norm1", ops.after(p["norm1"], ct), x))
  n2 = layer("norm2", ops.after(p["norm2"], ct), c1)
  grads["conv2"], dn2 = vjp("conv2", p["conv2"], n2, ct, split=True)
  grads["norm2"], dc1 = vjp("norm2", p["norm2"], c1, dn2)
  n1_after = dc1
  if "nin_shortcut" in p:
    # Its kernel gradient now, while little else is alive, from a copy of x made now (x tied
    # through the parameters only would let CSE keep the forward pass's copy alive until here),
    # and before n1 exists.
    grads["nin_shortcut"], _ = vjp("nin_shortcut", p["nin_shortcut"], ops.after(x, dc1), ct)
    n1_after = grads["nin_shortcut"]
  n1 = layer("norm1", ops.after(p["norm1"], n1_after), x)
  grads["conv1"], dn1 = vjp("conv1", p["conv1"], n1, dc1, split=True)
  grads["norm1"], dx = vjp("norm1", p["norm1"], x, dn1)
  if "nin_shortcut" in p:
    # In memory before the shortcut's gradient is added: x and dn1 can go first.
    dx = ops.in_memory(dx)
    (dx_short,) = jax.vjp(lambda g: layer("nin_shortcut", ops.after(p["nin_shortcut"], dx), g),
                          x)[1](ct)
  else:
    dx_short = ct
  return grads, (dx + dx_short.astype(dx.dtype)).astype(x.dtype)


class Downsample(nn.Module):
  """MONAI AEKLDownsample: pad (0, 1) per axis, then a stride-2 3³ conv without padding."""
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    nd = x.ndim - 2
    return layers.Conv(x.shape[-1], 3, strides=2, padding=((0, 1),) * nd, dtype=self.dtype,
                       name="conv")(x)


class Upsample(nn.Module):
  """MONAI Upsample(nontrainable, nearest ×2) followed by its 3³ `postconv`."""
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.Conv(x.shape[-1], 3, padding=1, dtype=self.dtype,
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
      return res_block(h.shape[-1], ch, self.norm_num_groups, self.norm_eps, name=name(), **kw)(h)

    def attn(h):
      return layers.SpatialAttentionBlock(self.norm_num_groups, self.norm_eps, name=name(),
                                          **kw)(h)

    h = layers.Conv(self.channels[0], 3, padding=1, name=name(), **kw)(x)
    for level, ch in enumerate(self.channels):
      for _ in range(self.num_res_blocks[level]):
        h = res(h, ch)
        if self.attention_levels[level]:
          h = attn(h)
      if level != len(self.channels) - 1:
        h = Downsample(name=name(), **kw)(h)
    if self.with_nonlocal_attn:
      h = attn(res(h, self.channels[-1]))
      h = res(h, self.channels[-1])
    h = layers.GroupNorm(self.norm_num_groups, self.norm_eps, name=name(), **kw)(h)
    return layers.Conv(self.out_channels, 3, padding=1, name=name(), **kw)(h)


class Decoder(nn.Module):
  """MONAI Decoder: the encoder mirrored, nearest ×2 + conv upsampling, GroupNorm, conv.

  With `remat`, beyond recomputing each res block, everything below full resolution is one
  recomputed segment: its blocks' saved inputs (1 GiB in float32 for the paper autoencoder) are
  not kept through the full-resolution backward pass, which sets the memory peak; they are
  recomputed after it, at the cost of one more forward pass over the low-resolution part.
  """
  channels: tuple[int, ...]
  out_channels: int
  num_res_blocks: tuple[int, ...]
  norm_num_groups: int
  norm_eps: float
  attention_levels: tuple[bool, ...]
  with_nonlocal_attn: bool = True
  remat: bool = False
  dtype: layers.Dtype = jnp.float32

  def setup(self):
    res_block = layers.remat(AEResBlock) if self.remat else AEResBlock
    kw = dict(dtype=self.dtype)
    res = lambda cin, cout: res_block(cin, cout, self.norm_num_groups, self.norm_eps,  # noqa: E731
                                      **kw)
    attn = lambda: layers.SpatialAttentionBlock(self.norm_num_groups,  # noqa: E731
                                                self.norm_eps, **kw)
    rev_ch = tuple(reversed(self.channels))
    rev_attn = tuple(reversed(self.attention_levels))
    rev_nres = tuple(reversed(self.num_res_blocks))
    ch = rev_ch[0]
    blocks = [layers.Conv(ch, 3, padding=1, **kw)]
    if self.with_nonlocal_attn:
      blocks += [res(ch, ch), attn(), res(ch, ch)]
    self.full_resolution_from = 0  # the index of the last upsampling block
    for level, level_ch in enumerate(rev_ch):
      for _ in range(rev_nres[level]):
        blocks.append(res(ch, level_ch))
        ch = level_ch
        if rev_attn[level]:
          blocks.append(attn())
      if level != len(rev_ch) - 1:
        self.full_resolution_from = len(blocks)
        blocks.append(Upsample(**kw))
    blocks.append(layers.GroupNorm(self.norm_num_groups, self.norm_eps, **kw))
    blocks.append(layers.Conv(self.out_channels, 3, padding=1, **kw))
    self.blocks = blocks  # named blocks_0, blocks_1, ... as MONAI's state dict

  def __call__(self, z: jax.Array) -> jax.Array:
    if self.remat and self.full_resolution_from:
      h = layers.recompute(Decoder.low_resolution, self, z)
    else:
      h = self.low_resolution(z)
    for block in self.blocks[self.full_resolution_from:]:
      h = block(h)
    return h

  def low_resolution(self, z: jax.Array) -> jax.Array:
    """The blocks before the last upsampling."""
    for block in self.blocks[:self.full_resolution_from]:
      z = block(z)
    return z


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
                  remat=self.remat, dtype=dtype)
    encoder = layers.remat(Encoder) if self.remat else Encoder
    self.encoder = encoder(out_channels=self.latent_channels,
                           with_nonlocal_attn=self.with_encoder_nonlocal_attn, **common)
    self.decoder = Decoder(out_channels=self.out_channels,
                           with_nonlocal_attn=self.with_decoder_nonlocal_attn, **common)
    conv1 = lambda name: layers.Conv(self.latent_channels, 1, dtype=dtype, name=name)  # noqa: E731
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
