"""Every conv lowering equals the native convolution: forward, input grad, kernel grad, under jit.

Implementations are chosen as everywhere, with `ops.backend` (the one route).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brain_ldm_jax.cpu import dispatch
from brain_ldm_jax.cpu import lowerings
from brain_ldm_jax.cpu.thresholds import THRESHOLDS
from brain_ldm_jax.errors import ConfigError
from brain_ldm_jax.nn import ops

REWRITES = ("onednn", "depth_sum", "depth_fold", "im2col", "native_im2col", "patches")

# (kernel size, stride, padding per axis): the network's 3^3 conv, its stride-2 downsample, 1^3.
CASES = [(3, 1, (1, 1)), (3, 2, (0, 1)), (1, 1, (0, 0)), (1, 2, (0, 0))]


def _conv(x, w, b=None, *, impl, **kw):
  with ops.backend(impl):
    return ops.conv(x, w, b, **kw)


def _upsample2_conv(x, w, b=None, *, impl, padding):
  with ops.backend(impl):
    return ops.upsample2_conv(x, w, b, padding=padding)


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _inputs(spatial, k, cin=3, cout=4):
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (2, *spatial, cin), jnp.float32)
  w = jax.random.normal(kw, (*(k,) * len(spatial), cin, cout), jnp.float32)
  return x, w


def _value_and_grads(impl, stride, pad, nd):
  """Jitted (y, dx, dw) for the loss sum(conv(x, w) * ct), ct a fixed random cotangent."""

  def f(x, w, ct):
    def loss(x, w):
      y = _conv(x, w, strides=(stride,) * nd, padding=(pad,) * nd, impl=impl)
      return jnp.sum(y * ct), y
    (_, y), (dx, dw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w)
    return y, dx, dw

  return jax.jit(f)


@functools.lru_cache
def _native_reference(spatial, k, stride, pad):
  """Inputs, cotangent and native (y, dx, dw), computed once per case for all rewrites."""
  x, w = _inputs(spatial, k)
  nd = len(spatial)
  y = _conv(x, w, strides=(stride,) * nd, padding=(pad,) * nd, impl="native")
  ct = jax.random.normal(jax.random.PRNGKey(1), y.shape)
  return x, w, ct, _value_and_grads("native", stride, pad, nd)(x, w, ct)


def _check_against_native(impl, spatial, k, stride, pad):
  x, w, ct, ref = _native_reference(spatial, k, stride, pad)
  got = _value_and_grads(impl, stride, pad, len(spatial))(x, w, ct)
  for name, g, r in zip(("y", "dx", "dw"), got, ref):
    assert g.shape == r.shape, (name, g.shape, r.shape)
    assert _rel(g, r) < 1e-5, (impl, name, _rel(g, r))


@pytest.mark.parametrize("impl", REWRITES)
@pytest.mark.parametrize("k,stride,pad", CASES)
def test_3d_lowering_matches_native(impl, k, stride, pad):
  _check_against_native(impl, (6, 7, 5), k, stride, pad)


@pytest.mark.parametrize("spatial,pad,strides,plane_min", [
    ((6, 8, 5), ((1, 1),) * 3, (1, 1, 1), 1),  # whole tiles, along depth and height
    ((5, 7, 5), ((1, 1),) * 3, (1, 1, 1), 1),  # odd sizes: the last tiles' second rows are cut
    ((5, 6, 5), ((0, 2), (1, 0), (1, 1)), (1, 1, 2), 1),  # uneven padding, width stride
    ((5, 6, 5), ((0, 2), (0, 1), (1, 1)), (1, 2, 1), 1),  # height stride 2: depth only
    ((6, 8, 5), ((1, 1),) * 3, (1, 1, 1), 10**9),  # a small plane: depth only
])
def test_winograd_matches_native(monkeypatch, spatial, pad, strides, plane_min):
  # Value (with bias) and both gradients against the native convolution. The forward pass runs
  # along depth and height (plane_min 1) or depth only; the gradients along depth only.
  monkeypatch.setitem(THRESHOLDS, "winograd_dh_min_plane", plane_min)
  x, w = _inputs(spatial, 3, cin=5, cout=4)
  bias = jax.random.normal(jax.random.PRNGKey(3), (4,))

  def value_and_grads(impl):
    def f(x, w, bias):
      return _conv(x, w, bias, strides=strides, padding=pad, impl=impl)
    y = f(x, w, bias)
    ct = jax.random.normal(jax.random.PRNGKey(1), y.shape)
    grads = jax.grad(lambda *a: jnp.sum(f(*a) * ct), argnums=(0, 1, 2))(x, w, bias)
    return (y, *grads)

  got = jax.jit(lambda: value_and_grads("winograd"))()
  for name, g, r in zip(("y", "dx", "dw", "dbias"), got, value_and_grads("native")):
    assert g.shape == r.shape, (name, g.shape, r.shape)
    assert _rel(g, r) < 1e-5, (name, _rel(g, r))


def test_winograd_rejects_other_kernels():
  x, w = _inputs((6, 7, 5), 1)
  with pytest.raises(ValueError, match="kernel size 3 and stride 1 along depth"):
    _conv(x, w, strides=(1, 1, 1), padding=((0, 0),) * 3, impl="winograd")


@pytest.mark.parametrize("stride,pad,min_rows,chunks", [(1, (1, 1), 80, (1, 6)),
                                                          (2, (0, 1), 150, (2, 2))])
def test_chunked_kernel_grad_matches_native(monkeypatch, stride, pad, min_rows, chunks):
  # Chunks of one or two output depth slices (the stride-2 case pads its last chunk): the slab
  # bounds of every chunk are exercised.
  monkeypatch.setitem(THRESHOLDS, "dw_chunk_floats", 1)
  monkeypatch.setitem(THRESHOLDS, "dw_chunk_min_rows", min_rows)
  d_out = (6 + sum(pad) - 3) // stride + 1
  assert lowerings._depth_chunks(d_out, 70, 3) == chunks
  _check_against_native("depth_sum", (6, 7, 5), 3, stride, pad)


def test_depth_chunks_cover_output_once():
  for d_out, rows, cin in [(40, 2240, 16), (40, 2240, 128), (20, 560, 256), (5, 140, 512),
                           (160, 35840, 64)]:
    size, n = lowerings._depth_chunks(d_out, rows, cin)
    assert (n - 1) * size < d_out <= n * size
  # The paper-width AE level splits; a small latent conv stays whole.
  assert lowerings._depth_chunks(40, 2240, 128)[1] > 1
  assert lowerings._depth_chunks(20, 560, 16)[1] == 1


@pytest.mark.parametrize("impl", ["auto", *REWRITES])
def test_2d_input_uses_native(impl):
  x, w = _inputs((7, 5), 3)
  kw = dict(strides=(2, 1), padding=((0, 1), (1, 1)))
  np.testing.assert_array_equal(_conv(x, w, impl=impl, **kw),
                                _conv(x, w, impl="native", **kw))


def test_auto_under_jit_matches_native():
  x, w = _inputs((6, 7, 5), 3)
  kw = dict(strides=(1, 1, 1), padding=((1, 1),) * 3)
  got = jax.jit(lambda x, w: _conv(x, w, impl="auto", **kw))(x, w)
  assert _rel(got, _conv(x, w, impl="native", **kw)) < 1e-5


def test_choose_impl_rule():
  choose = dispatch.choose_impl
  s1, s2 = (1, 1, 1), (2, 2, 2)
  # Without oneDNN: the XLA rewrites.
  assert choose((1, 40, 56, 40, 32), (3, 3, 3, 32, 32), s1, "cpu") == "depth_sum"
  assert choose((1, 40, 56, 40, 32), (3, 3, 3, 32, 32), s2, "cpu") == "depth_sum"
  assert choose((1, 10, 14, 10, 512), (3, 3, 3, 512, 512), s1, "cpu") == "depth_sum"
  assert choose((1, 40, 56, 40, 16), (3, 3, 3, 16, 32), s1, "cpu") == "depth_sum"
  assert choose((1, 40, 56, 40, 8), (3, 3, 3, 8, 16), s1, "cpu") == "depth_fold"
  assert choose((1, 20, 28, 20, 7), (3, 3, 3, 7, 32), s1, "cpu") == "depth_fold"
  assert choose((1, 40, 56, 40, 1), (3, 3, 3, 1, 16), s1, "cpu") == "im2col"
  assert choose((1, 20, 28, 20, 256), (1, 1, 1, 256, 512), s1, "cpu") == "native_im2col"
  assert choose((1, 3, 4, 3, 768), (3, 3, 3, 768, 768), s1, "cpu") == "patches"
  assert choose((1, 40, 56, 16), (3, 3, 16, 16), (1, 1), "cpu") == "native"
  # With oneDNN: winograd for 3^3 convs with many channels on large planes (not too large).
  for x_shape, cin, cout in [((1, 20, 28, 20), 256, 256), ((1, 20, 28, 20), 768, 256),
                             ((1, 12, 16, 12), 512, 256), ((1, 10, 14, 10), 1024, 512),
                             ((1, 40, 56, 40), 128, 128), ((6, 10, 14, 10), 64, 64)]:
    assert choose((*x_shape, cin), (3, 3, 3, cin, cout), s1, "cpu", onednn=True) == "winograd"
  # oneDNN for every other 3D conv but the weight-bound ones: small planes, few channels, strides,
  # other kernels, and inputs too large to keep twice (the paper autoencoder's 128 channels).
  for x_shape, k_shape, s in [((1, 40, 56, 40, 32), (3, 3, 3, 32, 32), s2),
                              ((1, 40, 56, 40, 32), (3, 3, 3, 32, 32), s1),
                              ((1, 20, 28, 20, 128), (3, 3, 3, 128, 128), s2),
                              ((6, 10, 14, 10, 96), (3, 3, 3, 96, 32), s1),
                              ((1, 160, 224, 160, 128), (3, 3, 3, 128, 64), s1),
                              ((1, 80, 112, 80, 64), (3, 3, 3, 64, 64), s1),
                              ((1, 40, 56, 40, 1), (3, 3, 3, 1, 16), s1),
                              ((1, 20, 28, 20, 256), (1, 1, 1, 256, 512), s1),
                              ((6, 5, 7, 5, 64), (3, 3, 3, 64, 64), s1)]:
    assert choose(x_shape, k_shape, s, "cpu", onednn=True) == "onednn"
  # Weight-bound: the paper UNet's 768-channel levels at 3x4x3 and 5x7x5 (batch 1). Against a
  # oneDNN convolution that reorders its kernel every call, from a lower ratio (6x8x6, 512: 48);
  # not where the kernels are prepared once (samplers).
  assert choose((1, 3, 4, 3, 768), (3, 3, 3, 768, 768), s1, "cpu", onednn=True) == "patches"
  assert choose((1, 5, 7, 5, 768), (3, 3, 3, 768, 768), s1, "cpu", onednn=True) == "patches"
  assert choose((1, 5, 7, 5, 768), (3, 3, 3, 768, 768), s1, "cpu", onednn=True,
                prepared_kernels=True) == "patches"
  assert choose((1, 6, 8, 6, 512), (3, 3, 3, 512, 512), s1, "cpu", onednn=True) == "patches"
  assert choose((1, 6, 8, 6, 512), (3, 3, 3, 512, 512), s1, "cpu", onednn=True,
                prepared_kernels=True) == "onednn"
  assert choose((1, 6, 8, 6, 512), (3, 3, 3, 512, 512), s1, "cpu") == "depth_sum"
  assert choose((4, 6, 8, 6, 512), (3, 3, 3, 512, 512), s1, "cpu", onednn=True) == "onednn"
  assert choose((2, 4, 4, 4, 16), (3, 3, 3, 16, 16), s1, "cpu", onednn=True) == "onednn"
  assert choose((1, 40, 56, 16), (3, 3, 16, 16), (1, 1), "cpu", onednn=True) == "native"
  for platform in ("gpu", "cuda", "rocm", "tpu"):
    assert choose((1, 40, 56, 40, 16), (3, 3, 3, 16, 16), s1, platform) == "native"


def test_unknown_impl_raises():
  x, w = _inputs((6, 7, 5), 3)
  with pytest.raises(ConfigError, match="unknown"):
    _conv(x, w, strides=(1, 1, 1), padding=((1, 1),) * 3, impl="fft")


@pytest.mark.parametrize("path", ["products", "subpixel", "subpixel_depth_sum"])
def test_upsample2_conv_matches_upsample_then_native(monkeypatch, path):
  # Against the upsampled input convolved natively: value and the three gradients, borders
  # included. "products": oneDNN's handler (each input voxel times each tap, summed into the
  # outputs), which `auto` takes from tap_products_min_channels channels. "subpixel": the 8
  # parity convolutions of the low-resolution input; with impl="auto" their kernels' gradient
  # goes through oneDNN's sgemm, as at the paper's widths.
  products = path == "products"
  monkeypatch.setitem(THRESHOLDS, "tap_products_min_channels", 1 if products else 10**9)
  monkeypatch.setitem(THRESHOLDS, "subpixel_min_voxels", 1)  # a small input takes it too
  monkeypatch.setitem(THRESHOLDS, "onednn_matmul_min_kernel", 1)
  impl = "depth_sum" if path.endswith("depth_sum") else "auto"
  x, w = _inputs((3, 4, 5), 3, cin=6, cout=5)
  b = jax.random.normal(jax.random.PRNGKey(3), (5,))
  ct = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 8, 10, 5))
  pad = ((1, 1),) * 3

  def value_and_grads(f):
    loss = lambda x, w, b: (jnp.sum(f(x, w, b) * ct), f(x, w, b))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, y), grads = step(x, w, b)
    return step.lower(x, w, b).as_text(), (y, *grads)

  hlo, got = value_and_grads(
      lambda x, w, b: _upsample2_conv(x, w, b, padding=pad, impl=impl))
  _, ref = value_and_grads(lambda x, w, b: _conv(
      ops.upsample_nearest2(x), w, b, strides=(1, 1, 1), padding=pad, impl="native"))
  for name, g, r in zip(("y", "dx", "dw", "db"), got, ref):
    assert g.shape == r.shape, (name, g.shape, r.shape)
    assert _rel(g, r) < 1e-5, (name, _rel(g, r))
  assert ("upsample_conv" in hlo) == products
  assert "6x8x10x6" not in hlo, "the upsampled input was built"


def test_upsample2_conv_off_the_subpixel_path_keeps_only_the_small_input(monkeypatch):
  # Where the upsampled input is built (GPU/TPU, small inputs), the backward pass builds it again
  # rather than keeping it: the gradients' residuals are x and the kernel. impl="native" is plain
  # autodiff, which keeps it.
  monkeypatch.setitem(THRESHOLDS, "subpixel_min_voxels", 10**9)
  x, w = _inputs((3, 4, 5), 3, cin=6, cout=5)
  ct = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 8, 10, 5))
  pad = ((1, 1),) * 3

  def upsample_conv(impl):
    return lambda x, w: _upsample2_conv(x, w, padding=pad, impl=impl)

  def residual_shapes(f):
    return {leaf.shape for leaf in jax.tree_util.tree_leaves(jax.vjp(f, x, w)[1])}

  got, ref = (jax.vjp(upsample_conv(impl), x, w) for impl in ("auto", "native"))
  assert _rel(got[0], ref[0]) < 1e-6
  for g, r in zip(got[1](ct), ref[1](ct)):
    assert _rel(g, r) < 1e-6
  assert (2, 6, 8, 10, 6) in residual_shapes(upsample_conv("native"))
  assert residual_shapes(upsample_conv("auto")) == {x.shape, w.shape}
