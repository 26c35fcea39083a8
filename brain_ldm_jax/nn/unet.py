"""Diffusion UNet (MONAI `DiffusionModelUNet`), channels last, generic over 2D and 3D.

Submodule names mirror MONAI's state-dict names (`down_blocks.0.resnets.1` ->
`down_blocks_0/resnets_1`, `time_embed.0` -> `time_embed_0`, `out.2` -> `out_2`), so
`convert.py` maps weights mechanically.

Also here: the paper's hybrid conditioning (`hybrid_conditioning`): covariates broadcast as extra
input channels *and* given as a one-token context for cross-attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from brain_ldm_jax.nn import layers
from brain_ldm_jax.nn import ops


def hybrid_conditioning(z: jax.Array, cond: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Pinaya et al.'s conditioning: (latent, covariates) -> (UNet input, cross-attention context).

  z (B, *spatial, C), cond (B, n) -> x (B, *spatial, C + n) with the covariates broadcast as n
  constant channels after the latent channels, and context (B, 1, n).
  """
  if cond.ndim != 2 or cond.shape[0] != z.shape[0]:
    raise ValueError(f"hybrid_conditioning: cond must be (batch, n) with batch {z.shape[0]}, "
                     f"got {cond.shape}")
  cond = cond.astype(z.dtype)
  maps = jnp.broadcast_to(cond.reshape((cond.shape[0],) + (1,) * (z.ndim - 2) + (-1,)),
                          z.shape[:-1] + (cond.shape[-1],))
  return jnp.concatenate([z, maps], axis=-1), cond[:, None, :]


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """MONAI's sinusoidal embedding: [cos, sin] of t·exp(-ln(max_period)·i/half), zero-padded if odd."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class ResnetBlock(nn.Module):
  """MONAI DiffusionUNetResnetBlock with timestep conditioning; `up`/`down` resample inside."""
  out_channels: int
  norm_num_groups: int
  norm_eps: float
  up: bool = False
  down: bool = False
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    norm_silu = lambda name: layers.GroupNorm(self.norm_num_groups, self.norm_eps,  # noqa: E731
                                              silu=True, dtype=self.dtype, name=name)
    h = norm_silu("norm1")(x)
    if self.up:
      x = ops.upsample_nearest2(x)  # h is upsampled inside conv1
    elif self.down:
      x, h = layers.avg_pool2(x), layers.avg_pool2(h)
    h = layers.Conv(self.out_channels, 3, padding=1, dtype=self.dtype,
                    upsample=self.up, name="conv1")(h)
    temb = layers.Linear(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(emb))
    h = h + temb.reshape((temb.shape[0],) + (1,) * (h.ndim - 2) + (-1,))
    h = norm_silu("norm2")(h)
    h = layers.Conv(self.out_channels, 3, padding=1, zero_init=True, dtype=self.dtype,
                    name="conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = layers.Conv(self.out_channels, 1, dtype=self.dtype,
                      name="skip_connection")(x)
    return x.astype(h.dtype) + h


class TransformerBlock(nn.Module):
  """MONAI DiffusionUNetTransformerBlock: self-attn, cross-attn, GEGLU feed-forward; pre-LayerNorm."""
  num_heads: int
  upcast_attention: bool = False
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    attn = lambda name: layers.SelfAttention(self.num_heads, upcast=self.upcast_attention,  # noqa
                                             dtype=self.dtype, name=name)
    ln = lambda name: layers.LayerNorm(dtype=self.dtype, name=name)  # noqa: E731
    x = attn("attn1")(ln("norm1")(x)) + x
    x = attn("attn2")(ln("norm2")(x), context.astype(self.dtype)) + x
    return FeedForward(dtype=self.dtype, name="ff")(ln("norm3")(x)) + x


class FeedForward(nn.Module):
  """MONAI MLPBlock(act="GEGLU"): linear1 d -> 8d, x·GELU(gate) (exact erf), linear2 4d -> d."""
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    h = layers.Linear(8 * d, dtype=self.dtype, name="linear1")(x)
    h, gate = jnp.split(h, 2, axis=-1)
    h = h * nn.gelu(gate, approximate=False)
    return layers.Linear(d, dtype=self.dtype, name="linear2")(h)


class SpatialTransformer(nn.Module):
  """MONAI SpatialTransformer: GroupNorm, 1³ proj_in, transformer blocks, zero-init 1³ proj_out."""
  num_heads: int
  num_head_channels: int
  num_layers: int
  norm_num_groups: int
  norm_eps: float
  upcast_attention: bool = False
  remat: bool = False
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    c = x.shape[-1]
    inner = self.num_heads * self.num_head_channels
    h = layers.GroupNorm(self.norm_num_groups, self.norm_eps, dtype=self.dtype, name="norm")(x)
    h = layers.Conv(inner, 1, dtype=self.dtype, name="proj_in")(h)
    spatial = h.shape[1:-1]
    h = h.reshape(h.shape[0], -1, inner)
    block = layers.remat(TransformerBlock) if self.remat else TransformerBlock
    for i in range(self.num_layers):
      h = block(self.num_heads, self.upcast_attention, dtype=self.dtype,
                name=f"transformer_blocks_{i}")(h, context)
    h = h.reshape((h.shape[0],) + spatial + (inner,))
    h = layers.Conv(c, 1, zero_init=True, dtype=self.dtype,
                    name="proj_out")(h)
    return h + x.astype(h.dtype)


class _Resample(nn.Module):
  """Plain (non-resblock) resampling: stride-2 3³ conv `op` down, nearest ×2 + `postconv` up."""
  up: bool
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    del emb
    if self.up:
      return layers.Conv(x.shape[-1], 3, padding=1, dtype=self.dtype,
                         upsample=True, name="postconv")(x)
    return layers.Conv(x.shape[-1], 3, strides=2, padding=1, dtype=self.dtype, name="op")(x)


class _Level(nn.Module):
  """One down or up block of MONAI's UNet: res blocks, optional (cross-)attention, resampler.

  Down: returns (h, skip states). Up: consumes skip states (last first), returns h.
  """
  out_channels: int
  num_res_blocks: int
  attention: str  # "none" | "self" | "cross"
  num_head_channels: int
  add_resample: bool
  up: bool
  cfg: tuple  # (norm_num_groups, norm_eps, resblock_updown, transformer_num_layers, upcast, remat)
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, emb, context, skips=None):
    groups, eps, updown, n_layers, upcast, remat = self.cfg
    res_block = layers.remat(ResnetBlock) if remat else ResnetBlock
    kw = dict(dtype=self.dtype)
    outputs = []
    skips = list(skips) if skips is not None else None
    for i in range(self.num_res_blocks):
      if self.up:
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
      h = res_block(self.out_channels, groups, eps, name=f"resnets_{i}", **kw)(h, emb)
      if self.attention == "self":
        h = layers.SpatialAttentionBlock(groups, eps, self.num_head_channels, dtype=self.dtype,
                                         name=f"attentions_{i}")(h)
      elif self.attention == "cross":
        h = SpatialTransformer(self.out_channels // self.num_head_channels, self.num_head_channels,
                               n_layers, groups, eps, upcast, remat, name=f"attentions_{i}",
                               **kw)(h, context)
      outputs.append(h)
    if self.add_resample:
      name = "upsampler" if self.up else "downsampler"
      if updown:
        h = res_block(self.out_channels, groups, eps, up=self.up, down=not self.up, name=name,
                      **kw)(h, emb)
      else:
        h = _Resample(self.up, name=name, **kw)(h, emb)
      outputs.append(h)
    return h if self.up else (h, outputs)


class _MidBlock(nn.Module):
  """MONAI (CrossAttn|Attn)MidBlock: resnet_1, attention, resnet_2."""
  num_head_channels: int
  with_conditioning: bool
  cfg: tuple
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, emb, context):
    groups, eps, _, n_layers, upcast, remat = self.cfg
    res_block = layers.remat(ResnetBlock) if remat else ResnetBlock
    kw = dict(dtype=self.dtype)
    c = h.shape[-1]
    h = res_block(c, groups, eps, name="resnet_1", **kw)(h, emb)
    if self.with_conditioning:
      h = SpatialTransformer(c // self.num_head_channels, self.num_head_channels, n_layers, groups,
                             eps, upcast, remat, name="attention", **kw)(h, context)
    else:
      h = layers.SpatialAttentionBlock(groups, eps, self.num_head_channels, dtype=self.dtype,
                                       name="attention")(h)
    return res_block(c, groups, eps, name="resnet_2", **kw)(h, emb)


class DiffusionModelUNet(nn.Module):
  """MONAI DiffusionModelUNet (Rombach et al. 2022; Pinaya et al. 2022). Fields = MONAI's arguments.

  `__call__(x, timesteps, context=None, class_labels=None)`: x (B, *spatial, in_channels),
  timesteps (B,) int or float (a scalar is broadcast), context (B, S, cross_attention_dim) when
  `with_conditioning`, class_labels (B,) int when `num_class_embeds`. Returns float32
  (B, *spatial, out_channels). `dtype` is the compute dtype; `remat` recomputes res blocks and
  transformer blocks in the backward pass.
  """
  spatial_dims: int
  in_channels: int
  out_channels: int
  num_res_blocks: int | Sequence[int] = (2, 2, 2, 2)
  channels: Sequence[int] = (32, 64, 64, 64)
  attention_levels: Sequence[bool] = (False, False, True, True)
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  resblock_updown: bool = False
  num_head_channels: int | Sequence[int] = 8
  with_conditioning: bool = False
  transformer_num_layers: int = 1
  cross_attention_dim: int | None = None
  num_class_embeds: int | None = None
  upcast_attention: bool = False
  remat: bool = False
  dtype: str = "float32"

  def _validate(self):
    ch = tuple(self.channels)
    n = len(ch)
    if self.with_conditioning and self.cross_attention_dim is None:
      raise ValueError("DiffusionModelUNet: with_conditioning=True needs cross_attention_dim")
    if self.cross_attention_dim is not None and not self.with_conditioning:
      raise ValueError("DiffusionModelUNet: cross_attention_dim given but with_conditioning=False")
    if any(c % self.norm_num_groups for c in ch):
      raise ValueError(f"DiffusionModelUNet: channels {ch} must be multiples of norm_num_groups="
                       f"{self.norm_num_groups}")
    if len(self.attention_levels) != n:
      raise ValueError("DiffusionModelUNet: attention_levels needs one entry per channels level")
    heads = ((self.num_head_channels,) * n if isinstance(self.num_head_channels, int)
             else tuple(self.num_head_channels))
    nres = (self.num_res_blocks,) * n if isinstance(self.num_res_blocks, int) else tuple(
        self.num_res_blocks)
    if len(heads) != n or len(nres) != n:
      raise ValueError("DiffusionModelUNet: num_head_channels and num_res_blocks must be ints or "
                       "have one entry per channels level")
    for level, (c, att, hc) in enumerate(zip(ch, self.attention_levels, heads)):
      if (att or level == n - 1) and (hc <= 0 or c % hc):
        raise ValueError(f"DiffusionModelUNet: level {level} has attention but channels {c} are "
                         f"not divisible by num_head_channels {hc}")
    return ch, heads, nres

  @nn.compact
  def __call__(self, x: jax.Array, timesteps: jax.Array, context: jax.Array | None = None,
               class_labels: jax.Array | None = None) -> jax.Array:
    ch, heads, nres = self._validate()
    dtype = layers.as_dtype(self.dtype)
    if x.ndim != self.spatial_dims + 2 or x.shape[-1] != self.in_channels:
      raise ValueError(f"DiffusionModelUNet: expected x (batch, *{self.spatial_dims} spatial, "
                       f"{self.in_channels}) channels-last, got shape {x.shape}")
    if context is not None and not self.with_conditioning:
      raise ValueError("DiffusionModelUNet: context given but with_conditioning=False")
    if self.with_conditioning and context is None:
      raise ValueError("DiffusionModelUNet: with_conditioning=True needs a context "
                       f"(batch, tokens, {self.cross_attention_dim})")
    kw = dict(dtype=dtype)
    cfg = (self.norm_num_groups, self.norm_eps, self.resblock_updown,
           self.transformer_num_layers, self.upcast_attention, self.remat)

    # 1. time (and class) embedding.
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (x.shape[0],))
    t_emb = timestep_embedding(timesteps, ch[0]).astype(dtype)
    emb = layers.Linear(4 * ch[0], dtype=dtype, name="time_embed_0")(t_emb)
    emb = layers.Linear(4 * ch[0], dtype=dtype, name="time_embed_2")(nn.silu(emb))
    if self.num_class_embeds is not None:
      if class_labels is None:
        raise ValueError("DiffusionModelUNet: class_labels are required when num_class_embeds is "
                         "set")
      class_emb = nn.Embed(self.num_class_embeds, 4 * ch[0], embedding_init=nn.initializers.normal(
          1.0), name="class_embedding")(class_labels)
      emb = emb + class_emb.astype(dtype)

    # 2. down.
    def attention_kind(level):
      if not self.attention_levels[level]:
        return "none"
      return "cross" if self.with_conditioning else "self"

    h = layers.Conv(ch[0], 3, padding=1, dtype=dtype, name="conv_in")(x)
    skips = [h]
    for level, c in enumerate(ch):
      h, outs = _Level(c, nres[level], attention_kind(level), heads[level],
                       add_resample=level != len(ch) - 1, up=False, cfg=cfg,
                       name=f"down_blocks_{level}", **kw)(h, emb, context)
      skips += outs

    # 3. middle.
    h = _MidBlock(heads[-1], self.with_conditioning, cfg, name="middle_block", **kw)(
        h, emb, context)

    # 4. up: each level takes its res blocks' skips from the end of the stack.
    n = len(ch)
    for i in range(n):
      level = n - 1 - i
      k = nres[level] + 1
      skips, take = skips[:-k], skips[-k:]
      h = _Level(ch[level], k, attention_kind(level), heads[level], add_resample=i != n - 1,
                 up=True, cfg=cfg, name=f"up_blocks_{i}", **kw)(h, emb, context, take)

    # 5. out.
    h = layers.GroupNorm(self.norm_num_groups, self.norm_eps, silu=True, dtype=dtype,
                         name="out_0")(h)
    h = layers.Conv(self.out_channels, 3, padding=1, zero_init=True, dtype=dtype,
                    name="out_2")(h)
    return h.astype(jnp.float32)


def build_unet(cfg) -> DiffusionModelUNet:
  """DiffusionModelUNet from a config section (e.g. `presets.base_config(p).unet`)."""
  return DiffusionModelUNet(**layers.module_kwargs(DiffusionModelUNet, cfg, "unet"))
