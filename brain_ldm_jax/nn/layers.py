"""Shared layers with PyTorch/MONAI semantics, channels last.

Every convolution in the networks is a `Conv` from this file, and it calls `ops.conv`, the seam
where the platform's lowering is chosen (`ops.set_backend`).

Precision: parameters are float32; `dtype` is the compute dtype (bf16 on accelerators). Norm
statistics and softmax are always computed in float32 and cast back to the compute dtype.

Initialisers follow PyTorch's defaults (kaiming-uniform with a = sqrt(5), i.e. U(±1/sqrt(fan_in))
for weights and biases) so a freshly initialised network trains like MONAI's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from brain_ldm_jax.errors import ConfigError
from brain_ldm_jax.nn import ops

Dtype = Any
Initializer = Any

# PyTorch's default weight init for Conv/Linear: kaiming_uniform(a=sqrt(5)) == U(±1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def as_dtype(dtype: str | Dtype) -> jnp.dtype:
  """A compute dtype from a config string ("float32", "bfloat16") or a dtype."""
  try:
    return jnp.dtype(dtype)
  except TypeError as e:
    raise ConfigError(f"dtype={dtype!r} (autoencoder.dtype / unet.dtype): allowed 'float32' or "
                      "'bfloat16'") from e


def _uniform_bias_init(fan_in: int) -> Initializer:
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _pairs(padding: int | Sequence[int] | Sequence[tuple[int, int]], nd: int) -> tuple:
  """Padding given as an int, per-axis ints or per-axis (low, high) pairs -> per-axis pairs."""
  if isinstance(padding, int):
    return ((padding, padding),) * nd
  out = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  if len(out) != nd:
    raise ValueError(f"padding {padding!r} does not match {nd} spatial dims")
  return out


class Conv(nn.Module):
  """N-d convolution (MONAI `Convolution(conv_only=True)` / torch ConvNd), channels last.

  Kernel (*kernel_size, in, out); MONAI's (out, in, *kernel_size) maps by transposition.
  `padding` is an int (symmetric, as PyTorch) or per-axis (low, high) pairs (e.g. MONAI's
  AEKLDownsample pads (0, 1) and then convolves without padding: one asymmetric conv here).
  `upsample`: the input is first nearest-upsampled ×2 (MONAI's Upsample -> conv), computed by
  `ops.upsample2_conv` without building the upsampled input where it can.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: Any = 0
  use_bias: bool = True
  zero_init: bool = False  # MONAI's zero_module(...) convolutions
  kernel_init: Initializer | None = None
  dtype: Dtype = jnp.float32
  upsample: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    nd = x.ndim - 2
    cin = x.shape[-1]
    ks = (self.kernel_size,) * nd if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
    fan_in = cin * int(np.prod(ks))
    if self.zero_init:
      k_init, b_init = nn.initializers.zeros, nn.initializers.zeros
    else:
      k_init = self.kernel_init or torch_default_kernel_init
      b_init = nn.initializers.zeros if self.kernel_init else _uniform_bias_init(fan_in)
    kernel = self.param("kernel", k_init, ks + (cin, self.features), jnp.float32)
    strides = (self.strides,) * nd if isinstance(self.strides, int) else tuple(self.strides)
    bias = self.param("bias", b_init, (self.features,), jnp.float32) if self.use_bias else None
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.upsample:
      if any(s != 1 for s in strides):
        raise ValueError(f"Conv(upsample=True) takes stride 1, got {self.strides}")
      return ops.upsample2_conv(x, kernel, bias, padding=_pairs(self.padding, nd))
    return ops.conv(x, kernel, bias, strides=strides, padding=_pairs(self.padding, nd))


class Linear(nn.Module):
  """torch.nn.Linear: kernel (in, out) = torch weight transposed."""
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    kernel = self.param("kernel", torch_default_kernel_init, (cin, self.features), jnp.float32)
    y = ops.matmul(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", _uniform_bias_init(cin), (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm on channels-last input: contiguous channel groups, biased variance.

  `silu=True` applies SiLU to the output (MONAI's norm -> SiLU pairs) inside the same custom VJP,
  whose backward pass keeps only the input and per-group statistics and recomputes the rest in
  one fused pass: fewer full-size buffers than autodiff's (x - mean, x_hat, pre-activation).
  """
  num_groups: int
  epsilon: float = 1e-6
  affine: bool = True
  silu: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    if c % self.num_groups:
      raise ConfigError(f"GroupNorm: {c} channels are not divisible by norm_num_groups="
                        f"{self.num_groups}: channels must be multiples of norm_num_groups")
    if self.affine:
      scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
      bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    else:
      scale, bias = jnp.ones((c,), jnp.float32), jnp.zeros((c,), jnp.float32)
    y = group_norm(x, scale, bias, self.num_groups, self.epsilon, self.silu)
    return y.astype(self.dtype)


def _group_stats(x, num_groups, eps):
  """x as (B, voxels, C) float32, and its group means and 1/std broadcast to channels (B, 1, C)."""
  xc = x.astype(jnp.float32).reshape(x.shape[0], -1, x.shape[-1])
  mean = _group_mean(xc, num_groups)
  # Two-pass variance: as accurate as PyTorch's on inputs with a large mean.
  var = _group_mean(jnp.square(xc - mean), num_groups)
  return xc, mean, lax.rsqrt(var + eps)


def _group_mean(t, num_groups):
  """Mean of t (B, voxels, C) over the voxels and each group's channels, per channel (B, 1, C).

  Kept channels-last throughout (a reduction along contiguous channel rows, then a fold of each
  group's channels): XLA:CPU runs this several times faster than one reduction over (voxels,
  channels in group) of a (B, voxels, groups, channels per group) view.
  """
  b, v, c = t.shape
  return (_fold_groups(t.sum(axis=1), num_groups) / (v * (c // num_groups)))[:, None, :]


def _fold_groups(per_channel, num_groups):
  """(B, C) per-channel sums -> each group's total, repeated over the group's channels (B, C)."""
  b, c = per_channel.shape
  per_group = per_channel.reshape(b, num_groups, c // num_groups).sum(axis=-1)
  return jnp.repeat(per_group, c // num_groups, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(x, scale, bias, num_groups: int, eps: float, silu: bool):
  """GroupNorm (+ SiLU) in float32, channels last; the output has x's shape, float32."""
  return _group_norm_fwd(x, scale, bias, num_groups, eps, silu)[0]


def _group_norm_fwd(x, scale, bias, num_groups, eps, silu):
  xc, mean, rstd = _group_stats(x, num_groups, eps)
  y = (xc - mean) * rstd * scale + bias
  return (nn.silu(y) if silu else y).reshape(x.shape), (x, mean, rstd, scale, bias)


# From this many elements per tensor (64 MiB in float32) the backward pass keeps no full-size
# intermediate (the paper autoencoder's full-resolution levels); below it, one (faster: 1.5-2x at
# the demo and latent sizes, where memory is no concern).
_GROUP_NORM_LEAN_BWD_ELEMENTS = 2**24


def _group_norm_bwd(num_groups, eps, silu, residuals, ct):
  del eps
  x, mean, rstd, scale, bias = residuals
  xc = x.astype(jnp.float32).reshape(x.shape[0], -1, x.shape[-1])
  ctc = ct.astype(jnp.float32).reshape(xc.shape)
  lean = x.size >= _GROUP_NORM_LEAN_BWD_ELEMENTS
  # x_hat and the sigmoid are written unlike the forward pass's on purpose: written alike, CSE
  # merges them with the forward pass's (under remat, its input and statistics are the same) and
  # keeps them alive from there to here.
  x_hat = xc * rstd - mean * rstd

  def dy(sigmoid):
    if not silu:
      return ctc
    y = x_hat * scale + bias
    sig = sigmoid(y)
    return ctc * sig * (1 + y * (1 - sig))

  if lean:
    # dy is recomputed inside the two passes that read it: one variadic reduction (partial sums
    # per depth slice, so that XLA:CPU shares it among threads and float32 sums stay short), and
    # the final pass. Each computes the sigmoid its own way, or CSE would merge them into one
    # full-size buffer.
    rows = x.shape[1] if x.ndim > 3 else 1
    split = lambda t: t.reshape(t.shape[0], rows, -1, t.shape[-1])  # noqa: E731
    dy_sums = dy(lambda y: 1 - jax.nn.sigmoid(-y))
    dbias, dscale = lax.reduce((split(dy_sums), split(dy_sums * x_hat)),
                               (np.float32(0), np.float32(0)),
                               lambda s, t: (s[0] + t[0], s[1] + t[1]), (2,))
    dbias, dscale = dbias.sum(1), dscale.sum(1)
    dy_dx = dy(lambda y: 1 / (1 + jnp.exp(-y)))
  else:
    # dy once, in memory (it may take ct's buffer); the reductions and the final pass read it.
    dy_dx = dy(lambda y: 1 - jax.nn.sigmoid(-y))
    dbias, dscale = jnp.sum(dy_dx, axis=1), jnp.sum(dy_dx * x_hat, axis=1)
  group_size = xc.shape[1] * (xc.shape[-1] // num_groups)
  m1 = _fold_groups(dbias * scale, num_groups)[:, None, :] / group_size
  m2 = _fold_groups(dscale * scale, num_groups)[:, None, :] / group_size
  dx = rstd * (dy_dx * scale - m1 - x_hat * m2)
  return dx.reshape(x.shape).astype(x.dtype), dscale.sum(0), dbias.sum(0)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm over the last axis (eps 1e-5 as PyTorch; Flax's default is 1e-6)."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * lax.rsqrt(var + self.epsilon)
    y = y * self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    y = y + self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return y.astype(self.dtype)


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm (momentum 0.1, eps 1e-5) with PyTorch's running-statistics semantics.

  Training mode (`use_running_average=False`) normalises with the batch's biased variance and,
  when `batch_stats` is mutable, updates running mean / *unbiased* running variance /
  num_batches_tracked exactly as PyTorch does, so converted statistics stay comparable. Eval mode
  uses the running statistics. Flax's own BatchNorm differs (momentum convention, biased running
  variance, no counter), hence this layer.
  """
  use_running_average: bool | None = None
  momentum: float = 0.1
  epsilon: float = 1e-5
  scale_init: Initializer = nn.initializers.ones
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    count = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
    xf = x.astype(jnp.float32)
    if use_ra:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      mean = xf.mean(axes)
      var = jnp.square(xf - mean).mean(axes)
      if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
        n = x.size // c
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * mean
        ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
        count.value = count.value + 1
    y = (xf - mean) * lax.rsqrt(var + self.epsilon)
    y = y * self.param("scale", self.scale_init, (c,), jnp.float32)
    y = y + self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return y.astype(self.dtype)


def avg_pool2(x: jax.Array) -> jax.Array:
  """AvgPool(kernel 2, stride 2) over all spatial axes (floor mode, as PyTorch)."""
  nd = x.ndim - 2
  spatial = x.shape[1:-1]
  x = x[(slice(None),) + tuple(slice(0, s - s % 2) for s in spatial)]
  shape = [x.shape[0]]
  for s in x.shape[1:-1]:
    shape += [s // 2, 2]
  x = x.reshape(shape + [x.shape[-1]])
  return x.mean(axis=tuple(2 + 2 * i for i in range(nd)), dtype=jnp.float32).astype(x.dtype)


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int,
                         upcast: bool = False) -> jax.Array:
  """Scaled dot-product attention as MONAI's SABlock/CrossAttentionBlock (no flash path).

  q (B, T, H*D), k/v (B, S, H*D) -> (B, T, H*D). Softmax in float32; with `upcast` (MONAI's
  `upcast_attention`, attention_dtype=float) the q·k logits are computed in float32 too.
  """
  b, t, inner = q.shape
  d = inner // num_heads
  q = q.reshape(b, t, num_heads, d)
  k = k.reshape(b, k.shape[1], num_heads, d)
  v = v.reshape(b, v.shape[1], num_heads, d)
  if upcast:
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  logits = jnp.einsum("bxhd,byhd->bhxy", q, k) * (d ** -0.5)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  out = jnp.einsum("bhxy,byhd->bxhd", weights, v)
  return out.reshape(b, t, inner)


class SelfAttention(nn.Module):
  """MONAI SABlock with separate to_q/to_k/to_v and an output projection `out_proj`."""
  num_heads: int
  qkv_bias: bool = False
  upcast: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    inner = x.shape[-1]
    kv = x if context is None else context
    q = Linear(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_q")(x)
    k = Linear(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_k")(kv)
    v = Linear(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_v")(kv)
    h = multi_head_attention(q, k, v, self.num_heads, self.upcast)
    return Linear(x.shape[-1], dtype=self.dtype, name="out_proj")(h)


class SpatialAttentionBlock(nn.Module):
  """MONAI SpatialAttentionBlock: GroupNorm, self-attention over all voxels, residual.

  `num_head_channels=None` gives one head (MONAI's AutoencoderKL); q/k/v have biases.
  """
  norm_num_groups: int
  norm_eps: float
  num_head_channels: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    if self.num_head_channels is not None and c % self.num_head_channels:
      raise ConfigError(f"{c} channels are not divisible by num_head_channels "
                       f"{self.num_head_channels}")
    heads = c // self.num_head_channels if self.num_head_channels else 1
    h = GroupNorm(self.norm_num_groups, self.norm_eps, dtype=self.dtype, name="norm")(x)
    h = h.reshape(x.shape[0], -1, c)
    h = SelfAttention(heads, qkv_bias=True, dtype=self.dtype, name="attn")(h)
    return h.reshape(x.shape).astype(x.dtype) + x


@functools.cache
def remat(cls: type[nn.Module]) -> type[nn.Module]:
  """`cls` recomputed in the backward pass: only its inputs and variables are kept for it.

  Unlike `nn.remat`, this survives XLA:CPU, which expands `jax.checkpoint`'s optimization barriers
  before common-subexpression elimination, so CSE merges the recomputation back into the forward
  pass and the activations stay alive (the paper AE step needed as much memory with remat as
  without). Here the recomputation takes its inputs through a data dependence on the cotangent,
  which no pass can hoist into the forward pass or merge with it; it costs one elementwise add.
  Parameter names, values and gradients are those of `cls` (a non-finite cotangent makes the
  input gradient non-finite, as it would be anyway).

  A class may order its own recomputation and backward pass (to bound the memory peak) with a
  static `remat_vjp(unbound_module, variables, args, ct) -> (params_ct, *args_ct)`; `ops.after`
  is the tool for that.
  """

  def call(module, *args):
    return cls.__call__(module, *args)

  class Recomputed(cls):

    def __call__(self, *args):
      if getattr(cls, "remat_vjp", None) is None:
        return recompute(call, self, *args)
      unbound = self.clone(parent=None, name=None)

      def forward(module, *args):
        return call(module, *args), (module.variables, args)

      def backward(residuals, ct):
        variables, args = residuals
        params_ct, *args_ct = cls.remat_vjp(unbound, variables, args, ct)
        return ({"params": params_ct}, *args_ct)

      return nn.custom_vjp(call, forward_fn=forward, backward_fn=backward)(self, *args)

  Recomputed.__name__ = Recomputed.__qualname__ = cls.__name__
  return Recomputed


def recompute(fn: Callable[..., Any], module: nn.Module, *args: Any) -> Any:
  """`fn(module, *args)`, keeping only `args` and the module's variables for the backward pass,
  which recomputes `fn` (tied to the cotangent, see `remat`). `fn` may be any method of the
  module, e.g. a segment of its blocks; parameters it does not use get zero gradients from it."""
  unbound = module.clone(parent=None, name=None)

  def forward(mdl, *args):
    return fn(mdl, *args), (mdl.variables, args)

  def backward(residuals, ct):
    variables, args = residuals
    args = ops.after(args, ct)
    _, vjp = jax.vjp(lambda v, *a: unbound.apply(v, *a, method=fn), variables, *args)
    variables_ct, *args_ct = vjp(ct)
    return ({"params": variables_ct["params"]}, *args_ct)

  return nn.custom_vjp(fn, forward_fn=forward, backward_fn=backward)(module, *args)


def module_kwargs(cls: type, cfg: Any, section: str) -> dict[str, Any]:
  """Constructor kwargs for a network module from a config section (ConfigDict or dict).

  Keys must be the module's field names (MONAI's argument names plus remat/dtype);
  sequences become tuples so the module stays hashable.
  """
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  items = cfg.items() if hasattr(cfg, "items") else dict(cfg).items()
  kwargs = {}
  for key, value in items:
    if key not in fields:
      raise ConfigError(f"{section}.{key}: unknown field for {cls.__name__}; "
                        f"known fields: {', '.join(sorted(fields))}")
    kwargs[key] = tuple(value) if isinstance(value, list) else value
  return kwargs
