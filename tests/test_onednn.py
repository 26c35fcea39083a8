"""The oneDNN custom calls (convolution, matmul): built, chosen by `auto` on CPU, exact, and safe
to lack."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from brain_ldm_jax.cpu import dispatch
from brain_ldm_jax.cpu import ffi
from brain_ldm_jax.cpu import onednn
from brain_ldm_jax.cpu.thresholds import THRESHOLDS
from brain_ldm_jax.nn import ops
from conftest import xla_flags


def _conv(x, w, b=None, *, impl, **kw):
  with ops.backend(impl):
    return ops.conv(x, w, b, **kw)


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _inputs(shape, k, cout, seed=0):
  kx, kw, kc = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, shape, jnp.float32)
  w = jax.random.normal(kw, (k, k, k, shape[-1], cout), jnp.float32) / (k**1.5 * shape[-1]**0.5)
  return x, w, kc


def test_onednn_is_available_here():
  # The dependency and a C++ compiler are part of the supported CPU install: this must hold in CI.
  assert ffi.available(), ffi.unavailable_reason()


@pytest.mark.parametrize("stride,pad,blocked", [(1, (1, 1), False), (2, (0, 1), False),
                                                (1, (1, 1), True), (2, (0, 1), True)])
def test_matches_native_at_blocked_widths(stride, pad, blocked, monkeypatch):
  # 16 -> 32 channels select oneDNN's blocked-kernel implementations (a kernel reorder each way),
  # unlike the 3 -> 4 channel cases of test_conv_lowering; `blocked` also reorders the activations
  # into oneDNN's layout and back, as the paper UNet's 512-768 channel convolutions do.
  monkeypatch.setitem(THRESHOLDS, "blocked_min_channels", 16 if blocked else 1 << 30)
  x, w, kc = _inputs((2, 8, 10, 6, 16), 3, 32)
  kw = dict(strides=(stride,) * 3, padding=(pad,) * 3)

  def value_and_grads(impl):
    def loss(x, w):
      y = _conv(x, w, impl=impl, **kw)
      return jnp.sum(y * jax.random.normal(kc, y.shape)), y
    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
    return (y, *grads)

  for name, got, ref in zip(("y", "dx", "dw"), value_and_grads("onednn"),
                            value_and_grads("native")):
    assert _rel(got, ref) < 1e-5, (name, _rel(got, ref))


@pytest.mark.parametrize("blocked", [False, True])
def test_bias_and_its_gradient_inside_the_call(blocked, monkeypatch):
  monkeypatch.setitem(THRESHOLDS, "blocked_min_channels", 8 if blocked else 1 << 30)
  x, w, kc = _inputs((2, 6, 7, 5, 8), 3, 16)
  bias = jax.random.normal(jax.random.PRNGKey(9), (16,), jnp.float32)
  kw = dict(strides=(1, 1, 1), padding=((1, 1),) * 3)

  def grads(impl):
    def loss(x, w, b):
      y = _conv(x, w, b, impl=impl, **kw)
      return jnp.sum(y * jax.random.normal(kc, y.shape)), y
    (_, y), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, w, bias)
    return (y, *g)

  for name, got, ref in zip(("y", "dx", "dw", "dbias"), grads("onednn"), grads("native")):
    assert _rel(got, ref) < 1e-5, (name, _rel(got, ref))


@pytest.mark.parametrize("blocked,cout", [(False, 32), (True, 32), (False, 40)])
def test_prepared_kernel_gives_the_same_values_and_gradients(blocked, cout, monkeypatch):
  # The reorder moves into a call of its own; the convolution and its gradients are unchanged,
  # to the bit. 40 output channels: oneDNN's layout pads the kernel beyond its own size.
  monkeypatch.setitem(THRESHOLDS, "blocked_min_channels", 16 if blocked else 1 << 30)
  x, w, kc = _inputs((2, 8, 10, 6, 16), 3, cout)
  bias = jax.random.normal(jax.random.PRNGKey(9), (cout,), jnp.float32)

  def run(prepare):
    def loss(x, w, b):
      y = onednn.conv(x, w, (1, 1, 1), ((1, 1),) * 3, b, prepare_kernel=prepare)
      return jnp.sum(y * jax.random.normal(kc, y.shape)), y
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, y), grads = fn(x, w, bias)
    return (y, *grads), fn.lower(x, w, bias).as_text().count(ffi.PREPARE_TARGET)

  (plain, n_plain), (prepared, n_prepared) = run(False), run(True)
  assert (n_plain, n_prepared) == (0, 1)
  for name, got, ref in zip(("y", "dx", "dw", "dbias"), prepared, plain):
    assert jnp.array_equal(got, ref), name


def test_prepared_kernel_too_small_for_its_layout_is_refused():
  x, w, _ = _inputs((1, 6, 6, 6, 16), 3, 40)
  geometry = onednn._geometry(x.shape, w.shape, (1, 6, 6, 6, 40), (1, 1, 1), ((1, 1),) * 3)
  assert onednn._prepared_kernel_bytes(geometry, 1) > w.size * 4  # padded: the case to guard
  too_small = jnp.zeros((w.size,), jnp.float32)
  with pytest.raises(Exception, match="more than the prepared kernel's"):
    jax.block_until_ready(jax.jit(lambda x, k, b: onednn._forward_ready(geometry, x, k, b))(
        x, too_small, jnp.zeros((40,), jnp.float32)))


def _computation(hlo: str, name: str) -> str:
  return next(block for block in hlo.split("\n\n") if block.split(" ", 1)[0] in (name, "%" + name))


def test_invariant_kernels_are_prepared_once_before_the_loop(monkeypatch):
  # Winograd's transformed kernels and oneDNN's reorders, at 16 channels standing in for 64+.
  monkeypatch.setitem(THRESHOLDS, "winograd_min_channels", 16)
  x, w, _ = _inputs((1, 6, 16, 16, 16), 3, 16)
  assert dispatch.choose_impl(x.shape, w.shape, (1, 1, 1), "cpu", onednn=True) == "winograd"

  def loop(w, x):
    step = lambda x, _: (x + 0.1 * ops.conv(x, w, strides=(1, 1, 1),  # noqa: E731
                                            padding=((1, 1),) * 3), None)
    return jax.lax.scan(step, x, None, length=3)[0]

  def invariant(w, x):
    with ops.invariant_kernels():
      return loop(w, x)

  tied, hoisted = jax.jit(loop).lower(w, x).compile(), jax.jit(invariant).lower(w, x).compile()
  assert _rel(hoisted(w, x), tied(w, x)) < 1e-6
  target = f'custom_call_target="{ffi.PREPARE_TARGET}"'
  assert target not in tied.as_text()
  text = hoisted.as_text()
  body = _computation(text, re.search(r"while\(.*?body=%?([\w.\-]+)", text).group(1))
  assert "brain_ldm_jax_onednn_conv" in body
  assert text.count(target) == 16 and target not in body  # one per transformed kernel, outside


def test_weight_bound_convolutions_take_prepared_onednn_kernels_in_loops():
  # A kernel between the two `patches` thresholds (27 * 16 taps x Cout per voxel: 54): `patches`
  # in a single call, oneDNN with its kernel prepared before the loop inside `invariant_kernels`.
  x, w, _ = _inputs((1, 2, 2, 2, 16), 3, 16)
  conv = lambda x: ops.conv(x, w, strides=(1, 1, 1), padding=((1, 1),) * 3)  # noqa: E731
  single = jax.jit(conv).lower(x).as_text()
  assert "patches_conv" in single and "onednn_conv" not in single

  def invariant(x):
    with ops.invariant_kernels():
      return conv(x)

  looped = jax.jit(invariant).lower(x).as_text()
  assert "patches_conv" not in looped and ffi.PREPARE_TARGET in looped
  assert _rel(jax.jit(invariant)(x), jax.jit(conv)(x)) < 1e-6


def test_probe_reads_each_example_first_element():
  x = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4) - 5.5
  for dtype in (jnp.float32, jnp.bfloat16):
    got = jax.jit(onednn.probe)(x.astype(dtype))
    assert got.dtype == jnp.float32
    assert got.tolist() == [-5.5, 6.5]


def test_materialize_is_an_identity_that_xla_cannot_fuse_through():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3))
  f = lambda x: jnp.sum(jnp.sin(onednn.materialize(jnp.exp(x) * 2.0)))  # noqa: E731
  ref = lambda x: jnp.sum(jnp.sin(jnp.exp(x) * 2.0))  # noqa: E731
  assert abs(float(jax.jit(f)(x)) - float(ref(x))) < 1e-5
  assert _rel(jax.jit(jax.grad(f))(x), jax.grad(ref)(x)) < 1e-6
  hlo = jax.jit(f).lower(x).compile().as_text()
  assert ffi.MATERIALIZE_TARGET in hlo
  assert not any("exponential" in line and "sine" in line for line in hlo.splitlines())


def test_auto_uses_onednn_for_float32_on_cpu_only():
  x, w, _ = _inputs((1, 6, 7, 5, 8), 3, 8)
  kw = dict(strides=(1, 1, 1), padding=((1, 1),) * 3)
  hlo = lambda x, w: jax.jit(lambda x, w: ops.conv(x, w, **kw)).lower(x, w).as_text()
  assert ffi.TARGET in hlo(x, w)
  assert ffi.TARGET not in hlo(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))


def test_vmap_matches_native():
  x, w, _ = _inputs((3, 2, 6, 7, 5, 4), 3, 8)
  kw = dict(strides=(1, 1, 1), padding=((1, 1),) * 3)
  got = jax.vmap(lambda x: _conv(x, w, impl="onednn", **kw))(x)
  ref = jax.vmap(lambda x: _conv(x, w, impl="native", **kw))(x)
  assert _rel(got, ref) < 1e-5


def test_rejects_other_dtypes():
  x, w, _ = _inputs((1, 6, 7, 5, 4), 3, 4)
  with pytest.raises(TypeError, match="float32"):
    onednn.conv(x.astype(jnp.bfloat16), w, (1, 1, 1), ((1, 1),) * 3)


def test_unavailable_falls_back_and_says_why(monkeypatch):
  monkeypatch.setitem(ffi._status, "reason", "no oneDNN library here")
  assert not ffi.available()
  x, w, _ = _inputs((1, 6, 7, 5, 16), 3, 16)
  kw = dict(strides=(1, 1, 1), padding=((1, 1),) * 3)
  hlo = jax.jit(lambda x, w: ops.conv(x, w, **kw)).lower(x, w).as_text()
  assert ffi.TARGET not in hlo
  with pytest.raises(ffi.OnednnUnavailableError, match="no oneDNN library here"):
    _conv(x, w, impl="onednn", **kw)


def test_missing_library_is_named(monkeypatch, tmp_path):
  monkeypatch.setenv("BRAIN_LDM_ONEDNN_LIB", str(tmp_path / "libdnnl.so.3"))
  with pytest.raises(ffi.OnednnUnavailableError, match="libdnnl.so.3 is not a file"):
    ffi.onednn_library()


def test_build_goes_to_the_cache_once(monkeypatch, tmp_path):
  monkeypatch.setenv("BRAIN_LDM_CACHE", str(tmp_path))
  built = ffi.build()
  assert built.parent == tmp_path and built.is_file()
  assert [p.name for p in tmp_path.iterdir()] == [built.name]  # no partial files left behind

  def no_compiler(*args, **kwargs):
    raise AssertionError("rebuilt although the cached library matches")

  monkeypatch.setattr(subprocess, "run", no_compiler)
  assert ffi.build() == built


def test_build_error_is_reported(monkeypatch, tmp_path):
  monkeypatch.setenv("BRAIN_LDM_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", "false")
  with pytest.raises(ffi.OnednnUnavailableError, match="building onednn_conv.cc failed"):
    ffi.build()
  assert not any(tmp_path.glob("*.so"))


def test_load_without_a_compiler_falls_back_once_with_a_warning(monkeypatch, tmp_path, caplog):
  # As at backend choice on a machine without g++ (nothing cached): a warning that says why,
  # the XLA lowerings from then on, and no second attempt in the same process.
  monkeypatch.setitem(ffi._status, "tried", False)
  monkeypatch.setitem(ffi._status, "reason", ffi._status["reason"])
  monkeypatch.setenv("BRAIN_LDM_CACHE", str(tmp_path))
  monkeypatch.delenv("CXX", raising=False)
  monkeypatch.setattr(shutil, "which", lambda name: None)
  monkeypatch.setattr(ffi, "handler_library", lambda: ffi.build())  # not the cached library
  with caplog.at_level(logging.WARNING):
    reason = ffi.load()
  assert "no C++ compiler found" in reason and not ffi.available()
  assert "CPU convolutions use the slower XLA lowerings" in caplog.text
  monkeypatch.setattr(ffi, "build", lambda: pytest.fail("built again"))
  assert ffi.load() == reason
  x, w, _ = _inputs((1, 6, 7, 5, 4), 3, 4)
  hlo = jax.jit(lambda x, w: ops.conv(x, w, strides=(1, 1, 1), padding=((1, 1),) * 3)).lower(
      x, w).as_text()
  assert "custom_call" not in hlo


def test_matmul_matches_dot_values_and_gradients():
  # A dense layer through oneDNN's sgemm: the forward (x @ w), the input gradient (dy @ w^T) and
  # the kernel gradient (x^T @ dy, summed over all leading dims); also under vmap.
  kx, kw, kc = jax.random.split(jax.random.PRNGKey(3), 3)
  x = jax.random.normal(kx, (2, 3, 5, 24), jnp.float32)
  w = jax.random.normal(kw, (24, 40), jnp.float32)

  def value_and_grads(matmul):
    def loss(x, w):
      y = matmul(x, w)
      return jnp.sum(y * jax.random.normal(kc, y.shape)), y
    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
    return (y, *grads)

  for name, got, ref in zip(("y", "dx", "dw"), value_and_grads(onednn.matmul),
                            value_and_grads(jnp.dot)):
    assert got.shape == ref.shape and _rel(got, ref) < 1e-6, (name, _rel(got, ref))
  assert _rel(jax.vmap(onednn.matmul, (0, None))(x, w), jnp.dot(x, w)) < 1e-6


def test_matmul_rejects_bad_operands():
  x = jnp.ones((2, 3, 4), jnp.float32)
  with pytest.raises(ValueError, match=r"kernel \(K, N\), got \(2, 3, 4\) and \(5, 2\)"):
    onednn.matmul(x, jnp.ones((5, 2), jnp.float32))
  with pytest.raises(ValueError, match="x \\(B, ..., K\\)"):
    onednn.matmul(jnp.ones((4,), jnp.float32), jnp.ones((4, 2), jnp.float32))
  with pytest.raises(TypeError, match="float32"):
    onednn.matmul(x.astype(jnp.bfloat16), jnp.ones((4, 2), jnp.bfloat16))


def test_large_dense_kernels_use_onednn_matmul():
  # ops.matmul (dense layers, `patches`): oneDNN's sgemm from 2^18 kernel elements on,
  # in float32; XLA's dot below that and in bfloat16.
  def uses_onednn(x, w):
    return "onednn_matmul" in jax.jit(ops.matmul).lower(x, w).as_text()

  x = jnp.ones((1, 3, 512), jnp.float32)
  assert THRESHOLDS["onednn_matmul_min_kernel"] == 512 * 512
  assert uses_onednn(x, jnp.ones((512, 512), jnp.float32))
  assert not uses_onednn(x, jnp.ones((512, 511), jnp.float32))
  assert not uses_onednn(x.astype(jnp.bfloat16), jnp.ones((512, 512), jnp.bfloat16))


@pytest.mark.parametrize("handler", [True, False])
def test_patches_matches_native(handler, monkeypatch):
  # A weight-bound convolution (`patches`, here 27 * 64 x 160 kernel elements against 12 voxels):
  # through its own handler (the taps gathered in the call, sgemm), or, without the handler, the
  # slices in XLA and oneDNN's matmul. Values and the three gradients, bias included.
  if not handler:
    monkeypatch.setattr(dispatch, "onednn_usable", lambda x, kernel: False)
  x, w, kc = _inputs((1, 2, 3, 2, 64), 3, 160)
  bias = jax.random.normal(jax.random.PRNGKey(9), (160,), jnp.float32)
  kw = dict(strides=(1, 1, 1), padding=((1, 1),) * 3)
  assert dispatch.choose_impl(x.shape, w.shape, (1, 1, 1), "cpu", onednn=True) == "patches"

  def value_and_grads(impl):
    def loss(x, w, b):
      y = _conv(x, w, b, impl=impl, **kw)
      return jnp.sum(y * jax.random.normal(kc, y.shape))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return step, step(x, w, bias)

  step, (value, grads) = value_and_grads("patches")
  hlo = step.lower(x, w, bias).as_text()
  assert ("patches_conv" in hlo) == handler
  assert ("onednn_matmul" in hlo) == (not handler)
  _, (ref_value, ref_grads) = value_and_grads("native")
  assert abs(float(value - ref_value)) <= 1e-5 * abs(float(ref_value))
  for got, ref in zip(grads, ref_grads):
    assert _rel(got, ref) < 1e-5


def test_patches_handler_refuses_mismatched_operands():
  # The handler indexes its buffers by the shape attributes: buffers of other sizes are an error,
  # not a read past their end.
  x, w, _ = _inputs((1, 2, 3, 2, 4), 3, 5)
  geometry = onednn._geometry(x.shape, w.shape, (1, 2, 3, 2, 5), (1, 1, 1), ((1, 1),) * 3)
  bias = jnp.zeros((5,), jnp.float32)
  call = lambda x: onednn._conv_pass(ffi.PATCHES_TARGET, onednn._FORWARD, geometry, x, w,
                                     bias)
  assert jax.jit(call)(x)[0].shape == (1, 2, 3, 2, 5)
  with pytest.raises(Exception, match="operand sizes do not match"):
    jax.block_until_ready(jax.jit(lambda x: call(x[:, :1]))(x))


def test_upsample_handler_refuses_other_problems():
  # Only the x2 upsampling of a 3x3x3 convolution with padding 1, with buffers of the sizes its
  # attributes imply.
  x, w, _ = _inputs((1, 2, 3, 2, 4), 3, 5)
  bias = jnp.zeros((5,), jnp.float32)

  def call(y_shape, x_used=lambda x: x):
    geometry = onednn._geometry(x.shape, w.shape, y_shape, (1, 1, 1), ((1, 1),) * 3)
    return jax.jit(lambda x: onednn._conv_pass(ffi.UPSAMPLE_TARGET, onednn._FORWARD,
                                               geometry, x_used(x), w, bias))(x)

  assert call((1, 4, 6, 4, 5))[0].shape == (1, 4, 6, 4, 5)
  with pytest.raises(Exception, match="output twice the input"):
    jax.block_until_ready(call((1, 2, 3, 2, 5)))
  with pytest.raises(Exception, match="operand sizes do not match"):
    jax.block_until_ready(call((1, 4, 6, 4, 5), lambda x: x[:, :, :2]))
  with pytest.raises(ValueError, match="3, 3, 3, Cin, Cout"):
    onednn.upsample2_conv(x, w[:2])


def test_hlo_flops_counts_every_pass():
  # Splat attributes (all dims equal) print as one value in the HLO text: x, y and the kernel here.
  x, w, _ = _inputs((3, 3, 3, 3, 3), 3, 3)
  kw = dict(strides=(1, 1, 1), padding=((1, 1),) * 3)
  loss = lambda x, w: jnp.sum(_conv(x, w, impl="onednn", **kw) ** 2)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile()
  per_pass = 2.0 * 3**4 * 3**5  # output voxels (batch included) * kernel volume * Cin * Cout
  assert onednn.hlo_flops(compiled.as_text()) == 3 * per_pass
  loss = lambda x, w: jnp.sum(_conv(x, w, impl="patches", **kw) ** 2)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile()
  assert "patches_conv" in compiled.as_text()
  assert onednn.hlo_flops(compiled.as_text()) == 3 * per_pass
  # The upsampling convolution: 27 taps per input voxel, not per output voxel.
  loss = lambda x, w: jnp.sum(onednn.upsample2_conv(x, w) ** 2)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile()
  assert onednn.hlo_flops(compiled.as_text()) == 3 * per_pass
  # Matmuls: 2 * result elements * contraction for the forward and both gradients.
  a, b = jnp.ones((2, 5, 24), jnp.float32), jnp.ones((24, 40), jnp.float32)
  compiled = jax.jit(jax.grad(lambda a, b: jnp.sum(onednn.matmul(a, b) ** 2),
                              argnums=(0, 1))).lower(a, b).compile()
  assert onednn.hlo_flops(compiled.as_text()) == 3 * 2.0 * 10 * 24 * 40


_SHARDED_PROGRAM = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from brain_ldm_jax.cpu import onednn
from brain_ldm_jax.nn import ops

ops.set_backend()

rng = np.random.default_rng(0)
x, r = (rng.standard_normal(s).astype(np.float32) for s in ((4, 6, 7, 5, 8), (4, 6, 7, 5, 16)))
w = (rng.standard_normal((3, 3, 3, 8, 16)) / 15).astype(np.float32)
b = rng.standard_normal((16,)).astype(np.float32)

m = (rng.standard_normal((16, 8)) / 4).astype(np.float32)

def loss(x, r, w, b, m):
  with ops.backend("onednn"):
    y = ops.conv(onednn.materialize(x * 2.0), w, b, strides=(1, 1, 1), padding=((1, 1),) * 3)
  z = onednn.matmul(y, m)
  with ops.backend("patches"):
    p = ops.conv(x, w, b, strides=(1, 1, 1), padding=((1, 1),) * 3)
  u = onednn.upsample2_conv(x[:, :3, :3, :2], w, b)
  return (jnp.sum(y * r) + jnp.sum(onednn.probe(y)) + jnp.sum(z * z) + jnp.sum(p * r)
          + jnp.sum(u * r[:, :, :6, :4]))

step = jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3, 4)))
mesh = Mesh(np.array(jax.devices()), ("data",))
batch, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
args = [jax.device_put(a, s)
        for a, s in zip((x, r, w, b, m), (batch, batch, whole, whole, whole))]
ref, got = step(x, r, w, b, m), step(*args)
hlo = step.lower(*args).compile().as_text()
calls = [l for l in hlo.splitlines() if "custom_call_target" in l]  # shapes: results, operands
rel = lambda a, b: float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))
print(json.dumps({"rel": [rel(got[0], ref[0])] + [rel(g, q) for g, q in zip(got[1], ref[1])],
                  "devices": len(got[1][0].sharding.device_set), "all_gather": "all-gather" in hlo,
                  "whole_batch": sum("f32[4," in l for l in calls),
                  "own_examples": sum("f32[2," in l for l in calls)}))
"""


def test_batch_sharded_program_runs_each_devices_examples():
  # Two CPU devices, batch split over them: every custom call (the convolution's, `patches`',
  # the upsampling convolution's and matmul's forward and both gradients, probe, materialize)
  # runs on its device's 2 examples, nothing is gathered, and the kernel and bias gradients are
  # summed across devices: the same numbers as on one device.
  env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", _SHARDED_PROGRAM], env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result["devices"] == 2
  assert max(result["rel"]) < 1e-6, result
  assert not result["all_gather"]
  assert result["whole_batch"] == 0 and result["own_examples"] == 14, result
