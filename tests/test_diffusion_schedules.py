"""Schedules, timestep listings and the training objective against MONAI."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import import_reference

from brain_ldm_jax import api
from brain_ldm_jax import diffusion
from brain_ldm_jax import presets


@pytest.fixture(scope="module")
def monai_schedulers():
  import_reference("torch")
  return import_reference("monai").networks.schedulers


@pytest.mark.parametrize("name,kwargs", [
    ("linear_beta", dict(beta_start=1e-4, beta_end=2e-2)),
    ("scaled_linear_beta", dict(beta_start=0.0015, beta_end=0.0205)),  # the paper
    ("sigmoid_beta", dict(beta_start=1e-4, beta_end=2e-2)),
    ("cosine", {}),
])
@pytest.mark.parametrize("num_train_timesteps", [1000, 37])
def test_schedule_equals_monai(monai_schedulers, name, kwargs, num_train_timesteps):
  ref = monai_schedulers.DDPMScheduler(num_train_timesteps, name, **kwargs)
  ours = diffusion.make_schedule(name, num_train_timesteps, **kwargs)
  for field in ("betas", "alphas", "alphas_cumprod"):
    got = np.asarray(getattr(ours, field))
    assert got.dtype == np.float32 and got.shape == (num_train_timesteps,)
    # An ulp or two: torch's SIMD linspace and cos round a few entries differently; for "cosine"
    # β = 1 − ᾱ_t/ᾱ_{t−1} turns an ulp of cos into ~4e-7 absolute (both sides are float32).
    atol = 5e-7 if name == "cosine" else 1e-9
    np.testing.assert_allclose(got, getattr(ref, field).numpy(), rtol=1e-6, atol=atol,
                               err_msg=field)


def test_schedule_from_config_is_the_paper_schedule():
  config = presets.base_config("paper")
  run = api.Run(config=config, params={}, stats=None, scale_factor=1.0, affine=np.eye(4),
                checkpoint="in-memory")  # no weights: only its options are asked
  assert api.sampling_options(run) == dict(sampler="ddim", num_steps=50, eta=0.0,
                                           guidance_scale=1.0)
  assert (config.diffusion.prediction_type, config.diffusion.clip_sample) == ("epsilon", False)
  # The paper preset leaves the spacing to the sampler, and DDIM's own default is the paper's.
  assert config.sampling.timestep_spacing is None
  ddim_defaults = inspect.signature(diffusion.samplers.ddim_sample).parameters
  assert ddim_defaults["timestep_spacing"].default == "leading"
  cfg = config.diffusion
  s = diffusion.schedule_from_config(cfg)
  assert s.num_train_timesteps == 1000
  np.testing.assert_allclose(np.asarray(s.betas)[[0, -1]], [0.0015, 0.0205], rtol=1e-6)
  # cosine ignores the beta range, so the same config section works for it.
  cfg.schedule = "cosine"
  assert diffusion.schedule_from_config(cfg).num_train_timesteps == 1000
  cfg.schedule = "nope"
  with pytest.raises(ValueError, match="diffusion.schedule"):
    diffusion.schedule_from_config(cfg)


def test_linspace_timesteps_equal_monai_listing(monai_schedulers):
  """MONAI 1.6's DDIM and DDPM `set_timesteps` listings, every N, with and without offset."""
  ddpm = monai_schedulers.DDPMScheduler(1000)
  ddim0 = monai_schedulers.DDIMScheduler(1000)
  ddim1 = monai_schedulers.DDIMScheduler(1000, steps_offset=1)
  for n in range(1, 1001):
    ddpm.set_timesteps(n)
    ddim0.set_timesteps(n)
    np.testing.assert_array_equal(diffusion.ddim_timesteps(1000, n, "linspace"), ddpm.timesteps)
    np.testing.assert_array_equal(diffusion.ddim_timesteps(1000, n, "linspace"), ddim0.timesteps)
    if n < 1000:  # n = 1000 with offset 1 repeats timesteps; we refuse it
      ddim1.set_timesteps(n)
      np.testing.assert_array_equal(
          diffusion.ddim_timesteps(1000, n, "linspace", steps_offset=1), ddim1.timesteps)


def test_leading_timesteps_are_monai_self_consistent():
  """GenerativeModels 0.2's listing; MONAI's step() previous timestep t − T//N is the next one."""
  np.testing.assert_array_equal(diffusion.ddim_timesteps(1000, 50)[:3], [980, 960, 940])
  for n, offset in [(50, 0), (50, 1), (7, 0), (7, 3), (1000, 0), (1, 0)]:
    ts = diffusion.ddim_timesteps(1000, n, "leading", offset)
    assert len(ts) == n and ts[-1] == offset
    np.testing.assert_array_equal(ts[1:], ts[:-1] - 1000 // n)
  for n, offset in [(20, 0), (20, 1), (50, 0), (200, 0), (1, 0)]:
    ts = diffusion.ddim_timesteps(1000, n, "quadratic", offset)
    assert len(ts) == n and ts[0] == 999 and ts[-1] == (offset if n > 1 else 999)
    assert np.all(np.diff(ts) < 0) and np.all(np.diff(ts, 2) >= -1)  # gaps shrink towards t = 0
  for spacing in diffusion.TIMESTEP_SPACINGS:  # all T steps: every spacing lists every timestep
    np.testing.assert_array_equal(diffusion.ddim_timesteps(1000, 1000, spacing),
                                  np.arange(999, -1, -1))
  with pytest.raises(ValueError, match="num_steps"):
    diffusion.ddim_timesteps(1000, 1001)
  with pytest.raises(ValueError, match="repeated"):
    diffusion.ddim_timesteps(1000, 1000, "leading", steps_offset=1)
  with pytest.raises(ValueError, match="timestep_spacing"):
    diffusion.ddim_timesteps(1000, 10, "uniform")


@pytest.mark.parametrize("prediction_type", diffusion.PREDICTION_TYPES)
def test_forward_process_and_targets_equal_monai(monai_schedulers, prediction_type):
  torch = import_reference("torch")
  ref = monai_schedulers.DDPMScheduler(1000, "scaled_linear_beta", beta_start=0.0015,
                                       beta_end=0.0205)
  s = diffusion.make_schedule("scaled_linear_beta", 1000, 0.0015, 0.0205)
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(4, 3, 5, 2)).astype(np.float32)
  noise = rng.normal(size=x0.shape).astype(np.float32)
  t = np.array([0, 17, 500, 999], np.int32)
  x0_t, noise_t, t_t = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t).long()
  np.testing.assert_allclose(diffusion.q_sample(s, x0, t, noise),
                             ref.add_noise(x0_t, noise_t, t_t).numpy(), rtol=1e-5, atol=1e-6)
  want = {"epsilon": noise, "sample": x0,
          "v_prediction": ref.get_velocity(x0_t, noise_t, t_t).numpy()}[prediction_type]
  np.testing.assert_allclose(diffusion.training_target(s, x0, noise, t, prediction_type), want,
                             rtol=1e-5, atol=1e-6)


def test_denoising_loss():
  s = diffusion.make_schedule("scaled_linear_beta", 1000, 0.0015, 0.0205)
  x0 = jax.random.normal(jax.random.key(1), (3, 4, 4, 2))
  cond = jnp.ones((3, 4))

  def apply_fn(params, x_t, t, *, cond):
    assert t.shape == (3,) and t.dtype == jnp.int32 and cond.shape == (3, 4)
    return params["w"] * x_t

  params = {"w": jnp.float32(0.5)}

  @jax.jit
  def loss_grad_and_by_hand(params, key):
    loss_fn = lambda p: diffusion.denoising_loss(apply_fn, p, x0, key, s, "v_prediction",
                                                 cond=cond)
    loss, grad = jax.value_and_grad(loss_fn)(params)
    # The same draws by hand.
    t_key, n_key = jax.random.split(key)
    t = diffusion.sample_timesteps(t_key, 3, 1000)
    noise = jax.random.normal(n_key, x0.shape)
    x_t = diffusion.q_sample(s, x0, t, noise)
    target = diffusion.training_target(s, x0, noise, t, "v_prediction")
    return loss, grad, jnp.mean((0.5 * x_t - target) ** 2), t

  loss, grad, by_hand, t = loss_grad_and_by_hand(params, jax.random.key(7))
  assert t.shape == (3,) and bool(jnp.all((t >= 0) & (t < 1000)))
  np.testing.assert_allclose(loss, by_hand, rtol=1e-6)
  assert loss.dtype == jnp.float32
  assert jnp.isfinite(grad["w"]) and grad["w"] != 0
  assert diffusion.diffusion_loss(jnp.ones(3, jnp.bfloat16), jnp.zeros(3)).dtype == jnp.float32
  with pytest.raises(ValueError, match="prediction_type"):
    diffusion.training_target(s, x0, x0, t, "x0")
