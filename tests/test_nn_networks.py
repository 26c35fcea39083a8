"""Networks beyond parity: paper parameter counts, builders, remat, bf16, conditioning, weight files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import import_reference

from brain_ldm_jax import nn as bnn
from brain_ldm_jax import presets
from brain_ldm_jax.nn import convert
from brain_ldm_jax.nn import ops

_EXTRA = ("remat", "dtype")


def n_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def monai_n_params(cls, section) -> int:
  torch = import_reference("torch")
  kwargs = {k: v for k, v in section.items() if k not in _EXTRA}
  with torch.device("meta"):  # shapes only: no memory, no init cost
    model = cls(**kwargs)
  return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", ["paper", "test"])
def test_parameter_counts_match_monai(preset):
  nets = import_reference("monai.networks.nets")
  cfg = presets.base_config(preset)
  with ops.backend("native"):  # shapes do not depend on the lowering; it traces fastest
    ae = bnn.abstract_variables(bnn.build_autoencoder(cfg.autoencoder))
    unet = bnn.abstract_variables(bnn.build_unet(cfg.unet))
    disc = bnn.abstract_variables(bnn.build_discriminator(cfg.discriminator))
  assert n_params(ae["params"]) == monai_n_params(nets.AutoencoderKL, cfg.autoencoder)
  assert n_params(unet["params"]) == monai_n_params(nets.DiffusionModelUNet, cfg.unet)
  assert n_params(disc["params"]) == monai_n_params(nets.PatchDiscriminator, cfg.discriminator)
  if preset == "paper":  # the paper's published sizes
    assert n_params(ae["params"]) == 13_766_248
    assert n_params(unet["params"]) == 553_168_899
  # Every parameter is float32 whatever the compute dtype.
  assert {x.dtype for x in jax.tree.leaves(unet["params"])} == {jnp.dtype("float32")}


def test_builder_rejects_unknown_field():
  cfg = presets.base_config("test").unet
  cfg.unlock()
  cfg.chanels = (8, 16, 16)
  with pytest.raises(ValueError, match="chanels"):
    bnn.build_unet(cfg)


def test_hybrid_conditioning():
  z = jnp.arange(2 * 3 * 4 * 5 * 3, dtype=jnp.float32).reshape(2, 3, 4, 5, 3)
  cond = jnp.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
  x, context = bnn.hybrid_conditioning(z, cond)
  assert x.shape == (2, 3, 4, 5, 7) and context.shape == (2, 1, 4)
  np.testing.assert_array_equal(x[..., :3], z)  # latent channels first
  np.testing.assert_allclose(x[1, 2, 3, 4, 3:], cond[1])  # covariates everywhere
  np.testing.assert_allclose(x[0, 0, 0, 0, 3:], cond[0])
  np.testing.assert_allclose(context[:, 0], cond)


def test_sample_latent_statistics():
  mean = jnp.full((4000,), 2.0)
  logvar = jnp.full((4000,), np.log(0.25))
  z = bnn.sample_latent(mean, logvar, jax.random.key(0))
  assert abs(float(z.mean()) - 2.0) < 0.05 and abs(float(z.std()) - 0.5) < 0.05


def _tiny_unet(**kw):
  cfg = dict(spatial_dims=2, in_channels=3, out_channels=3, channels=(8, 16), num_res_blocks=1,
             attention_levels=(False, True), norm_num_groups=4, num_head_channels=(0, 8),
             resblock_updown=True, with_conditioning=True, transformer_num_layers=1,
             cross_attention_dim=2, upcast_attention=True)
  cfg.update(kw)
  return bnn.DiffusionModelUNet(**cfg)


def _unet_inputs():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 12, 3)).astype(np.float32)
  return x, np.array([10, 500]), rng.standard_normal((2, 1, 2)).astype(np.float32)


def _random_variables(module, seed):
  """Random float32 variables of the module's shapes, non-zero everywhere (zero-init convs would
  make gradients trivially equal); built with numpy from eval_shape, so nothing is compiled."""
  rng = np.random.default_rng(seed)

  def leaf(s):
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
    return rng.standard_normal(s.shape, np.float32) / np.float32(np.sqrt(fan_in))

  return jax.tree.map(leaf, bnn.abstract_variables(module))


def test_unet_remat_and_bf16():
  x, t, c = _unet_inputs()
  plain, remat = _tiny_unet(), _tiny_unet(remat=True)
  variables = _random_variables(plain, 2)
  assert jax.tree.structure(variables) == jax.tree.structure(bnn.abstract_variables(remat))

  def loss_fn(model):
    def loss(v):
      out = model.apply(v, x, t, c)
      return jnp.mean(out ** 2), out
    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  (l0, out0), g0 = loss_fn(plain)(variables)
  (l1, out1), g1 = loss_fn(remat)(variables)
  np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g0)
  assert float(jnp.abs(g0["params"]["out_2"]["kernel"]).sum()) > 0

  # bf16 compute with the same float32 params: runs, float32 output, close to float32.
  out_bf16 = jax.jit(_tiny_unet(dtype="bfloat16").apply)(variables, x, t, c)
  assert out_bf16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out_bf16 - out0) / jnp.linalg.norm(out0))
  assert rel < 5e-2, rel


@pytest.mark.parametrize("spatial_dims,conv_impl", [(2, "native"), (3, "auto")])
def test_autoencoder_remat_and_bf16(spatial_dims, conv_impl):
  # 3D "auto" runs the oneDNN custom calls and the ordered res-block backward pass with them.
  with ops.backend(conv_impl):
    _check_autoencoder_remat_and_bf16(spatial_dims)


def _check_autoencoder_remat_and_bf16(spatial_dims):
  kw = dict(spatial_dims=spatial_dims, channels=(8, 16), num_res_blocks=1,
            attention_levels=(False, False), norm_num_groups=4, with_encoder_nonlocal_attn=False,
            with_decoder_nonlocal_attn=False)
  plain, remat = bnn.AutoencoderKL(**kw), bnn.AutoencoderKL(**kw, remat=True)
  variables = _random_variables(plain, 0)
  shape = (2, 16, 12, 1) if spatial_dims == 2 else (2, 16, 12, 8, 1)
  x = np.random.default_rng(3).random(shape).astype(np.float32)
  key = jax.random.key(5)

  def step(model):
    def loss(v):
      recon, mean, logvar = model.apply(v, x, key)
      kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - logvar - 1)
      return jnp.mean(jnp.abs(recon - x)) + 1e-3 * kl, (recon, mean, logvar)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  (l0, (r0, m0, v0)), g0 = step(plain)(variables)
  (l1, (r1, m1, v1)), g1 = step(remat)(variables)
  assert r0.shape == x.shape and m0.shape == (2, *(s // 2 for s in shape[1:-1]), 3)
  assert v0.shape == m0.shape
  np.testing.assert_allclose(r1, r0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g1, g0)

  if spatial_dims == 2:
    r_bf16, m_bf16, _ = jax.jit(bnn.AutoencoderKL(**kw, dtype="bfloat16").apply)(variables, x,
                                                                                  key)
    assert r_bf16.dtype == m_bf16.dtype == jnp.float32
    assert float(jnp.linalg.norm(m_bf16 - m0) / jnp.linalg.norm(m0)) < 5e-2


def test_discriminator_batch_stats_update():
  disc = bnn.build_discriminator(presets.base_config("test").discriminator)
  disc = disc.clone(spatial_dims=2)
  variables = bnn.init_variables(disc, jax.random.key(0))
  x = np.random.default_rng(0).standard_normal((2, 32, 32, 1)).astype(np.float32)
  train = jax.jit(lambda v, x: disc.apply(v, x, use_running_average=False,
                                          mutable=["batch_stats"]))
  outs, updates = train(variables, x)
  assert outs[-1].shape == (2, 6, 6, 1)
  stats = updates["batch_stats"]["layers_0"]["adn_N"]
  assert int(stats["num_batches_tracked"]) == 1
  assert not np.allclose(stats["mean"], 0.0)
  with pytest.raises(ValueError, match="batch_stats"):
    bnn.flax_to_monai(variables["params"], "discriminator")


def test_weight_files_roundtrip_and_errors(tmp_path):
  torch = import_reference("torch")
  nets = import_reference("monai.networks.nets")
  kw = dict(spatial_dims=2, channels=(8, 8), num_res_blocks=1, attention_levels=(False, False),
            norm_num_groups=4, with_encoder_nonlocal_attn=False,
            with_decoder_nonlocal_attn=False)
  ref = nets.AutoencoderKL(**kw)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  model = bnn.AutoencoderKL(**kw)
  template = bnn.abstract_variables(model)

  torch.save({"state_dict": ref.state_dict(), "epoch": 3}, tmp_path / "ae.pt")
  torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, tmp_path / "ddp.pth")
  convert.save_npz(bnn.flax_to_monai(bnn.monai_to_flax(sd, "autoencoder", template),
                                     "autoencoder"), tmp_path / "ae.npz")
  for name in ("ae.pt", "ddp.pth", "ae.npz"):
    loaded = bnn.load_state_dict(tmp_path / name)
    assert loaded.keys() == sd.keys(), name
    for k in sd:
      np.testing.assert_array_equal(loaded[k], sd[k], err_msg=f"{name}: {k}")
  params = bnn.monai_to_flax(bnn.load_state_dict(tmp_path / "ae.pt"), "autoencoder",
                             template["params"])
  assert jax.tree.structure(params) == jax.tree.structure(template["params"])

  broken = dict(sd)
  del broken["encoder.blocks.0.conv.weight"]
  broken["encoder.extra.weight"] = np.zeros(3, np.float32)
  broken["post_quant_conv.conv.bias"] = np.zeros(5, np.float32)
  with pytest.raises(ValueError) as err:
    bnn.monai_to_flax(broken, "autoencoder", template)
  msg = str(err.value)
  assert "missing keys (1): encoder.blocks.0.conv.weight" in msg
  assert "unexpected keys (1): encoder.extra.weight" in msg
  assert "post_quant_conv.conv.bias" in msg and "shape mismatches" in msg
  with pytest.raises(ValueError, match="unknown weights format"):
    (tmp_path / "w.pkl").write_bytes(b"x")
    bnn.load_state_dict(tmp_path / "w.pkl")


def test_autoencoder_remat_lowers_compiled_memory():
  # XLA:CPU drops jax.checkpoint's optimization barriers and CSE then undoes the recomputation;
  # layers.remat must still shrink what the compiled backward pass keeps alive.
  kw = dict(spatial_dims=3, channels=(8, 16), num_res_blocks=2, attention_levels=(False, False),
            norm_num_groups=4, with_encoder_nonlocal_attn=False,
            with_decoder_nonlocal_attn=False)
  x = jax.ShapeDtypeStruct((1, 32, 32, 32, 1), jnp.float32)

  def temp_bytes(model):
    def loss(v, x):
      recon, _, _ = model.apply(v, x, jax.random.key(0))
      return jnp.mean(jnp.abs(recon - x))
    compiled = jax.jit(jax.grad(loss)).lower(bnn.abstract_variables(model), x).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  with ops.backend("native"):
    plain = temp_bytes(bnn.AutoencoderKL(**kw))
    remat = temp_bytes(bnn.AutoencoderKL(**kw, remat=True))
  assert remat < 0.6 * plain, (remat, plain)


def test_res_block_ordered_backward_lowers_its_peak():
  # The paper decoder's memory peak is its first full-resolution block (128 -> 64 channels): the
  # ordered backward pass must need less than XLA's own schedule of the generic recomputation.
  from brain_ldm_jax.nn import autoencoder, layers  # pylint: disable=g-import-not-at-top

  class Generic(autoencoder.AEResBlock):
    remat_vjp = None  # layers.remat's generic recomputation

  x = jax.ShapeDtypeStruct((1, 24, 24, 24, 32), jnp.float32)

  def temp_bytes(cls):
    block = layers.remat(cls)(32, 16, 4, 1e-6)
    variables = jax.eval_shape(block.init, jax.random.key(0), x)

    def loss(v, x):
      return jnp.sum(jnp.sin(block.apply(v, x)))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  ordered, generic = temp_bytes(autoencoder.AEResBlock), temp_bytes(Generic)
  assert ordered < 0.8 * generic, (ordered, generic)


@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_custom_vjp_matches_autodiff(silu, lean, monkeypatch):
  # lean: the backward pass large tensors take (no full-size intermediate kept).
  from brain_ldm_jax.nn import layers  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(layers, "_GROUP_NORM_LEAN_BWD_ELEMENTS", 0 if lean else 2**62)
  rng = np.random.default_rng(7)
  x = jnp.asarray(3.0 + rng.standard_normal((2, 5, 6, 4, 12)), jnp.float32)  # large mean
  scale = jnp.asarray(1 + 0.3 * rng.standard_normal(12), jnp.float32)
  bias = jnp.asarray(0.3 * rng.standard_normal(12), jnp.float32)
  w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  def reference(x, scale, bias):  # torch.nn.GroupNorm's formula, differentiated by jax
    g = x.reshape(2, -1, 3, 4)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
    y = ((g - mean) / jnp.sqrt(var + 1e-6)).reshape(x.shape) * scale + bias
    return jax.nn.silu(y) if silu else y

  ours = lambda x, s, b: layers.group_norm(x, s, b, 3, 1e-6, silu)  # noqa: E731
  np.testing.assert_allclose(ours(x, scale, bias), reference(x, scale, bias), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda *a: jnp.sum(w * f(*a))  # noqa: E731
  g_ours = jax.grad(loss(ours), argnums=(0, 1, 2))(x, scale, bias)
  g_ref = jax.grad(loss(reference), argnums=(0, 1, 2))(x, scale, bias)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert float(jnp.abs(g_ours[0]).max()) > 1e-2
