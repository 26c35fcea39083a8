"""Parity of our Flax networks with the installed MONAI package (random weights, float32).

Each case builds a MONAI model in PyTorch with every parameter randomised (MONAI's zero-initialised
convolutions and trivial norm affines included), converts its state dict, runs both on the same
random input and compares (relative L2 error < 1e-5). Exported weights must load back into MONAI
with strict=True, and GenerativeModels-style (old) names must load too.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import import_reference

from brain_ldm_jax import nn as bnn
from brain_ldm_jax.nn import convert
from brain_ldm_jax.nn import ops

torch = import_reference("torch")
monai_nets = import_reference("monai.networks.nets")

TOL = 1e-5
_EXTRA = ("remat", "dtype")
# Most cases pin the native lowering (it traces fastest); the "auto" cases cover the default path.
AUTO_CASES = ("2d_self_attn_classes", "2d_attn_nonlocal", "2d_instance")


def impl(case):
  return "auto" if case in AUTO_CASES else "native"


@pytest.fixture(autouse=True)
def conv_backend_of_case(request):
  """Each parametrized case runs under its backend (`ops.backend`, the one route)."""
  params = getattr(request.node, "callspec", None)
  case = params.params.get("case") if params else None
  with ops.backend(impl(case) if case else "auto"):
    yield


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def to_torch(x):  # channels last -> channels first
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def from_torch(t):
  return np.moveaxis(t.detach().numpy(), 1, -1)


def randomise(model, seed):
  """Every parameter random and non-trivial (so zero-init convs and norm affines are exercised)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2:
        fan_in = p[0].numel() if p.ndim > 1 else 1
        p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
      elif name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.1 * torch.randn(b.shape, generator=g))
      elif name.endswith("running_var"):
        b.copy_(1.0 + 0.5 * torch.rand(b.shape, generator=g))
  return model.eval()


def monai_kwargs(kw):
  return {k: v for k, v in kw.items() if k not in _EXTRA}


def state_dict_np(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def check_roundtrip(monai_cls, kw, variables, kind, reference_sd):
  """Exported weights load into a fresh MONAI model with strict=True, identical to the source."""
  exported = bnn.flax_to_monai(variables, kind)
  fresh = monai_cls(**monai_kwargs(kw))
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  for k, v in fresh.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), reference_sd[k], err_msg=k)
  return fresh


def to_old_names(sd, very_old=False):
  """A MONAI-core state dict renamed as MONAI GenerativeModels saved it (the bundle's names)."""
  out = {}
  for k, v in sd.items():
    n = k
    for a in ("attn1", "attn2"):
      n = n.replace(f".{a}.out_proj.", f".{a}.to_out.0.")
    for q in ("to_q", "to_k", "to_v"):
      n = n.replace(f".attn.{q}.", f".{q}.")
    n = n.replace(".attn.out_proj.", ".proj_attn.")
    n = n.replace(".postconv.", ".conv.")
    if very_old:
      n = n.replace(".ff.linear1.", ".ff.net.0.proj.").replace(".ff.linear2.", ".ff.net.2.")
    out[n] = v
  assert out.keys() != sd.keys()
  return out


UNET_CASES = {
    "2d_cross_attn": (dict(spatial_dims=2, in_channels=3, out_channels=2, channels=(8, 16, 16),
                           num_res_blocks=1, attention_levels=(False, True, True),
                           norm_num_groups=4, num_head_channels=(0, 8, 16),
                           resblock_updown=False, with_conditioning=True,
                           transformer_num_layers=1, cross_attention_dim=4,
                           upcast_attention=True), (16, 12)),
    "3d_paper_like": (dict(spatial_dims=3, in_channels=7, out_channels=3, channels=(8, 16, 24),
                           num_res_blocks=1, attention_levels=(False, True, True),
                           norm_num_groups=4, num_head_channels=(0, 4, 12),
                           resblock_updown=True, with_conditioning=True,
                           transformer_num_layers=2, cross_attention_dim=4,
                           upcast_attention=True), (8, 12, 8)),
    "2d_self_attn_classes": (dict(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16),
                                  num_res_blocks=(1, 2), attention_levels=(True, True),
                                  norm_num_groups=4, num_head_channels=4, resblock_updown=True,
                                  num_class_embeds=3), (12, 10)),
    "3d_mid_attn_only": (dict(spatial_dims=3, in_channels=2, out_channels=2, channels=(8, 8),
                              num_res_blocks=1, attention_levels=(False, False),
                              norm_num_groups=8, num_head_channels=8), (8, 8, 6)),
}


@pytest.mark.parametrize("case", list(UNET_CASES))
def test_unet_parity(case):
  kw, spatial = UNET_CASES[case]
  ref = randomise(monai_nets.DiffusionModelUNet(**kw), seed=len(case))
  sd = state_dict_np(ref)
  model = bnn.DiffusionModelUNet(**kw)
  variables = bnn.monai_to_flax(ref.state_dict(), "unet", model)

  rng = np.random.default_rng(0)
  b = 2
  x = rng.standard_normal((b,) + spatial + (kw["in_channels"],)).astype(np.float32)
  t = np.array([3, 817], np.int64)
  inputs, tinputs = {}, {}
  if kw.get("with_conditioning"):
    c = rng.standard_normal((b, 1, kw["cross_attention_dim"])).astype(np.float32)
    inputs["context"], tinputs["context"] = c, torch.from_numpy(c)
  if kw.get("num_class_embeds"):
    y = np.array([2, 0])
    inputs["class_labels"], tinputs["class_labels"] = y, torch.from_numpy(y)
  with torch.no_grad():
    want = from_torch(ref(to_torch(x), torch.from_numpy(t), **tinputs))
  apply = jax.jit(model.apply)
  got = apply(variables, x, t, **inputs)
  assert got.shape == want.shape and got.dtype == jnp.float32
  assert rel_err(got, want) < TOL, rel_err(got, want)

  fresh = check_roundtrip(monai_nets.DiffusionModelUNet, kw, variables, "unet", sd)
  with torch.no_grad():
    again = from_torch(fresh(to_torch(x), torch.from_numpy(t), **tinputs))
  np.testing.assert_array_equal(again, want)

  if kw.get("num_class_embeds") or kw.get("with_conditioning"):
    # Old (GenerativeModels) names: our loader and MONAI's load_old_state_dict agree.
    old = to_old_names(sd, very_old=case == "3d_paper_like")
    old_vars = bnn.monai_to_flax(old, "unet", model)
    jax.tree.map(np.testing.assert_array_equal, old_vars, variables)
    if case != "3d_paper_like":  # MONAI does not know the very old ff.net.* names
      legacy = monai_nets.DiffusionModelUNet(**kw)
      legacy.load_old_state_dict({k: torch.from_numpy(v) for k, v in old.items()})
      for k, v in legacy.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), sd[k], err_msg=k)


AE_CASES = {
    "2d_attn_nonlocal": (dict(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16),
                              num_res_blocks=(1, 2), attention_levels=(False, True),
                              latent_channels=3, norm_num_groups=4, norm_eps=1e-6,
                              with_encoder_nonlocal_attn=True, with_decoder_nonlocal_attn=True),
                         (16, 12)),
    "3d_demo_like": (dict(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16, 16),
                          num_res_blocks=1, attention_levels=(False, False, False),
                          latent_channels=3, norm_num_groups=4, norm_eps=1e-6,
                          with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False),
                     (16, 12, 8)),
}


@pytest.mark.parametrize("case", list(AE_CASES))
def test_autoencoder_parity(case):
  kw, spatial = AE_CASES[case]
  ref = randomise(monai_nets.AutoencoderKL(**kw), seed=7)
  sd = state_dict_np(ref)
  model = bnn.AutoencoderKL(**kw)
  variables = bnn.monai_to_flax(ref.state_dict(), "autoencoder", model)
  x = np.random.default_rng(1).standard_normal((2,) + spatial + (1,)).astype(np.float32)

  with torch.no_grad():
    mu, sigma = ref.encode(to_torch(x))
    recon = ref.decode(mu)
  mu, sigma, recon = from_torch(mu), from_torch(sigma), from_torch(recon)

  @jax.jit
  def run(v, x):
    mean, logvar = model.apply(v, x, method="encode")
    return mean, logvar, model.apply(v, mean, method="decode")

  mean, logvar, dec = run(variables, x)
  assert rel_err(mean, mu) < TOL
  # MONAI's z_sigma is exp(logvar / 2) of the same clamped log-variance.
  assert rel_err(jnp.exp(0.5 * logvar), sigma) < TOL
  assert rel_err(dec, recon) < TOL, rel_err(dec, recon)

  check_roundtrip(monai_nets.AutoencoderKL, kw, variables, "autoencoder", sd)
  if any(kw["attention_levels"]):
    old = to_old_names(sd)
    jax.tree.map(np.testing.assert_array_equal,
                 bnn.monai_to_flax(old, "autoencoder", model), variables)
    legacy = monai_nets.AutoencoderKL(**kw)
    legacy.load_old_state_dict({k: torch.from_numpy(v) for k, v in old.items()})
    for k, v in legacy.state_dict().items():
      np.testing.assert_array_equal(v.numpy(), sd[k], err_msg=k)


DISC_CASES = {
    "3d_batch": (dict(spatial_dims=3, channels=8, in_channels=1, out_channels=1, num_layers_d=2),
                 (20, 24, 16)),
    "2d_instance": (dict(spatial_dims=2, channels=8, in_channels=2, out_channels=1,
                         num_layers_d=3, norm="INSTANCE", last_conv_kernel_size=3), (40, 36)),
}


@pytest.mark.parametrize("case", list(DISC_CASES))
def test_discriminator_parity(case):
  kw, spatial = DISC_CASES[case]
  ref = randomise(monai_nets.PatchDiscriminator(**kw), seed=3)
  sd = state_dict_np(ref)
  model = bnn.PatchDiscriminator(**kw)
  variables = bnn.monai_to_flax(ref.state_dict(), "discriminator", model)
  x = np.random.default_rng(2).standard_normal((3,) + spatial + (kw["in_channels"],))
  x = x.astype(np.float32)

  with torch.no_grad():
    want_eval = [from_torch(o) for o in ref(to_torch(x))]
    ref.train()
    want_train = [from_torch(o) for o in ref(to_torch(x))]  # also updates running stats
  trained_sd = state_dict_np(ref)

  @jax.jit
  def run(v, x):
    evaluated = model.apply(v, x, use_running_average=True)
    trained, updates = model.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    return evaluated, trained, updates

  got_eval, got_train, updates = run(variables, x)
  assert len(got_eval) == len(want_eval) == kw["num_layers_d"] + 2
  for g, w in zip(got_eval + got_train, want_eval + want_train):
    assert g.shape == w.shape
    assert rel_err(g, w) < TOL, rel_err(g, w)

  check_roundtrip(monai_nets.PatchDiscriminator, kw, variables, "discriminator", sd)
  if kw.get("norm", "BATCH") == "BATCH":
    # Running statistics after one training step follow PyTorch (unbiased variance, counter).
    new_vars = {"params": variables["params"], **updates}
    exported = bnn.flax_to_monai(new_vars, "discriminator")
    for k, v in trained_sd.items():
      np.testing.assert_allclose(exported[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
