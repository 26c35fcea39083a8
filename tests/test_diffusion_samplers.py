"""DDPM and DDIM trajectories against a Python loop over MONAI's `step()`, with the same noise.

The network is a fixed nonlinear stand-in, written once for torch and once for jax. MONAI draws its
step noise with `torch.randn`; the tests swap the `torch` name inside MONAI's scheduler module for a
proxy whose `randn` returns our documented per-step noise, normal(fold_in(keys[b], j)).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import import_reference

from brain_ldm_jax import diffusion

T = 1000
SHAPE = (2, 3, 4, 2)  # (B, x, y, c)
PAPER = dict(name="scaled_linear_beta", beta_start=0.0015, beta_end=0.0205)


def _x0_guess(np_like, x, s):
  # A bounded, nonlinear "denoised" guess; its range (±1.5) exceeds [-1, 1] so clipping acts.
  return 1.3 * np_like.tanh(0.7 * x + 0.2) + 0.2 * np_like.sin(2.0 * x + s)


def _as_prediction(x0, x, alpha_cumprod, prediction_type):
  # The stand-in network outputs its x̂_0 guess in the requested parametrisation, so that every
  # chain stays bounded (a non-denoising ε would blow up to |x| ~ 300 over 1000 DDPM steps and
  # turn float32 rounding into visible differences).
  a, b = alpha_cumprod**0.5, (1.0 - alpha_cumprod)**0.5
  eps = (x - a * x0) / b
  return {"sample": x0, "epsilon": eps, "v_prediction": a * eps - b * x0}[prediction_type]


def net_jax(schedule, prediction_type):
  def fn(x, t):
    x0 = _x0_guess(jnp, x, t.astype(jnp.float32) / T)
    return _as_prediction(x0, x, schedule.alphas_cumprod[t], prediction_type)
  return fn


def net_torch(torch, scheduler, x, t):
  x0 = _x0_guess(torch, x, float(t) / T)
  return _as_prediction(x0, x, scheduler.alphas_cumprod[t], scheduler.prediction_type)


@jax.jit
def _documented_noise(keys):
  """Step j of sample b: normal(fold_in(keys[b], j), SHAPE[1:]), for all T steps at once."""
  per_sample = lambda k, j: jax.random.normal(jax.random.fold_in(k, j), SHAPE[1:])
  return jax.vmap(lambda j: jax.vmap(lambda k: per_sample(k, j))(keys))(jnp.arange(T))


class _TorchWithOurNoise:
  """Stands in for `torch` inside a MONAI scheduler module; `randn` returns `self.noise`."""

  def __init__(self, torch):
    self._torch = torch
    self.noise = None
    self.draws = 0

  def randn(self, shape, **kwargs):
    assert tuple(shape) == tuple(self.noise.shape)
    self.draws += 1
    return self._torch.from_numpy(self.noise).to(kwargs.get("dtype", self._torch.float32))

  def __getattr__(self, name):
    return getattr(self._torch, name)


@pytest.fixture(scope="module")
def ref():
  torch = import_reference("torch")
  monai = import_reference("monai")
  return torch, monai.networks.schedulers


def _monai_loop(ref, monkeypatch, scheduler, module, timesteps, x_T, keys, **step_kwargs):
  torch, _ = ref
  proxy = _TorchWithOurNoise(torch)
  monkeypatch.setattr(module, "torch", proxy)
  x = torch.from_numpy(np.array(x_T))
  noise = np.array(_documented_noise(keys))  # writable for torch; one compilation per file
  for j, t in enumerate(timesteps):
    proxy.noise = noise[j]
    x, _ = scheduler.step(net_torch(torch, scheduler, x, int(t)), int(t), x, **step_kwargs)
  return x.numpy(), proxy.draws


def _inputs(seed=0):
  x_T = jax.random.normal(jax.random.key(seed), SHAPE)
  keys = jax.random.split(jax.random.key(seed + 1), SHAPE[0])
  return x_T, keys


@functools.lru_cache(maxsize=None)
def _jitted(sampler, **options):
  schedule = diffusion.make_schedule(**PAPER)
  net = net_jax(schedule, options.get("prediction_type", "epsilon"))
  return jax.jit(lambda x_T, keys: diffusion.sample(net, x_T, keys, schedule, sampler=sampler,
                                                    **options))


@pytest.mark.parametrize("prediction_type,clip_sample,variance_type", [
    ("epsilon", False, "fixed_small"),  # the paper
    ("sample", True, "fixed_large"),
    ("v_prediction", True, "fixed_small"),  # MONAI's constructor default clip
])
def test_ddpm_1000_steps_equals_monai(ref, monkeypatch, prediction_type, clip_sample,
                                      variance_type):
  _, schedulers = ref
  sched = schedulers.DDPMScheduler(T, PAPER["name"], beta_start=PAPER["beta_start"],
                                   beta_end=PAPER["beta_end"], variance_type=variance_type,
                                   clip_sample=clip_sample, prediction_type=prediction_type)
  sched.set_timesteps(T)
  x_T, keys = _inputs()
  want, draws = _monai_loop(ref, monkeypatch, sched, schedulers.ddpm, sched.timesteps.numpy(),
                            x_T, keys)
  assert draws == T - 1  # MONAI adds no noise on the step from t = 0
  got = _jitted("ddpm", num_steps=T, prediction_type=prediction_type, clip_sample=clip_sample,
                timestep_spacing="linspace", variance_type=variance_type)(x_T, keys)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_steps,eta,prediction_type,clip_sample,set_alpha_to_one,offset", [
    (10, 0.0, "epsilon", False, True, 0),  # the paper's sampler (with 50 steps)
    (10, 0.0, "sample", False, True, 0),
    (10, 0.0, "v_prediction", False, True, 0),
    (10, 0.7, "epsilon", False, True, 0),
    (10, 0.7, "v_prediction", False, False, 1),
    (7, 1.0, "sample", True, False, 0),  # 1000 // 7 does not divide T
    (50, 0.0, "epsilon", True, False, 1),  # the paper's count, stable-diffusion-style ends
])
def test_ddim_equals_monai_on_leading_timesteps(ref, monkeypatch, num_steps, eta, prediction_type,
                                                 clip_sample, set_alpha_to_one, offset):
  torch, schedulers = ref
  sched = schedulers.DDIMScheduler(T, PAPER["name"], beta_start=PAPER["beta_start"],
                                   beta_end=PAPER["beta_end"], clip_sample=clip_sample,
                                   set_alpha_to_one=set_alpha_to_one, steps_offset=offset,
                                   prediction_type=prediction_type)
  sched.set_timesteps(num_steps)
  timesteps = diffusion.ddim_timesteps(T, num_steps, "leading", offset)
  # MONAI GenerativeModels' listing, where MONAI's step() (t -> t - T // N) is self-consistent.
  sched.timesteps = torch.from_numpy(timesteps.astype(np.int64))
  x_T, keys = _inputs(1)
  want, draws = _monai_loop(ref, monkeypatch, sched, schedulers.ddim, timesteps, x_T, keys,
                            eta=eta)
  assert draws == (num_steps if eta > 0 else 0)
  got = _jitted("ddim", num_steps=num_steps, eta=eta, prediction_type=prediction_type,
                clip_sample=clip_sample, set_alpha_to_one=set_alpha_to_one,
                steps_offset=offset)(x_T, None if eta == 0 else keys)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_ddpm_with_skipped_steps_is_ddim_eta_one(ref, monkeypatch):
  """DDPM's posterior over a jump t → s is MONAI's DDIM with eta = 1 (ε-prediction, no clip)."""
  torch, schedulers = ref
  sched = schedulers.DDIMScheduler(T, PAPER["name"], beta_start=PAPER["beta_start"],
                                   beta_end=PAPER["beta_end"], clip_sample=False)
  sched.set_timesteps(20)
  timesteps = diffusion.ddim_timesteps(T, 20, "leading")
  sched.timesteps = torch.from_numpy(timesteps.astype(np.int64))
  x_T, keys = _inputs(2)
  want, _ = _monai_loop(ref, monkeypatch, sched, schedulers.ddim, timesteps, x_T, keys, eta=1.0)
  got = _jitted("ddpm", num_steps=20, timestep_spacing="leading")(x_T, keys)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_samples_do_not_depend_on_batch_size():
  x_T, keys = _inputs(3)
  x_T = jnp.concatenate([x_T, x_T[:1] + 1.0])
  keys = jax.random.split(jax.random.key(9), 3)
  # DDPM draws its noise through the same `step_noise`; one sampler keeps compilations few.
  fn = _jitted("ddim", num_steps=10, eta=0.5)
  full = fn(x_T, keys)
  for b in range(3):
    np.testing.assert_allclose(fn(x_T[b:b + 1], keys[b:b + 1])[0], full[b], rtol=1e-6,
                               atol=1e-6, err_msg=f"sample {b}")
  # Different keys give different samples: the noise is real.
  other = fn(x_T, jax.random.split(jax.random.key(10), 3))
  assert float(jnp.max(jnp.abs(other - full))) > 1e-2


def test_whole_sampler_jits_once_and_runs_on_device():
  schedule = diffusion.make_schedule(**PAPER)
  traces = []

  def counting_net(x, t):
    traces.append((x.shape, t.shape, t.dtype))
    return net_jax(schedule, "epsilon")(x, t)

  @functools.partial(jax.jit, static_argnames=("options",))
  def run(x_T, keys, schedule, options):
    return diffusion.sample(counting_net, x_T, keys, schedule, **dict(options))

  options = tuple(sorted(dict(sampler="ddim", num_steps=50, eta=0.3).items()))
  x_T, keys = _inputs(4)
  run(x_T, keys, schedule, options)
  run(x_T + 1.0, keys, schedule, options)
  # One trace of the scan body for the whole 50-step chain, a scalar int32 timestep.
  assert traces == [(SHAPE, (), jnp.int32)]


def test_sample_refuses_options_the_sampler_does_not_have():
  schedule = diffusion.make_schedule(**PAPER)
  net = net_jax(schedule, "epsilon")
  x_T, keys = _inputs()
  with pytest.raises(ValueError, match="eta"):
    diffusion.sample(net, x_T, keys, schedule, sampler="ddpm", num_steps=10, eta=0.5)
  with pytest.raises(ValueError, match="eta"):
    diffusion.sample(net, x_T, keys, schedule, sampler="dpmpp_2m", num_steps=10, eta=0.5)
  with pytest.raises(ValueError, match="variance_type"):
    diffusion.sample(net, x_T, keys, schedule, sampler="ddim", num_steps=10,
                     variance_type="fixed_large")
  with pytest.raises(ValueError, match="sampling.sampler"):
    diffusion.sample(net, x_T, keys, schedule, sampler="euler", num_steps=10)
  with pytest.raises(ValueError, match="PRNG key"):
    diffusion.sample(net, x_T, None, schedule, sampler="ddim", num_steps=10, eta=0.5)
  with pytest.raises(ValueError, match="eta"):
    diffusion.sample(net, x_T, keys, schedule, sampler="ddim", num_steps=10, eta=1.5)


@pytest.mark.parametrize("num_steps,eta,prediction_type,clip_sample,set_alpha_to_one,offset", [
    (50, 0.0, "epsilon", False, True, 0),  # the published bundle's scheduler and step count
    (10, 0.7, "v_prediction", True, False, 1),
    (7, 1.0, "sample", False, True, 0),  # 1000 // 7 does not divide T
    (250, 0.0, "epsilon", False, False, 5),  # the last step lands on t = 1 >= 0, not the end
])
def test_ddim_monai_rule_equals_monai_default_scheduler(ref, monkeypatch, num_steps, eta,
                                                       prediction_type, clip_sample,
                                                       set_alpha_to_one, offset):
  """MONAI 1.6's DDIMScheduler as it comes: its own set_timesteps listing and step()."""
  _, schedulers = ref
  sched = schedulers.DDIMScheduler(T, PAPER["name"], beta_start=PAPER["beta_start"],
                                   beta_end=PAPER["beta_end"], clip_sample=clip_sample,
                                   set_alpha_to_one=set_alpha_to_one, steps_offset=offset,
                                   prediction_type=prediction_type)
  sched.set_timesteps(num_steps)
  x_T, keys = _inputs(5)
  want, draws = _monai_loop(ref, monkeypatch, sched, schedulers.ddim, sched.timesteps.numpy(),
                            x_T, keys, eta=eta)
  assert draws == (num_steps if eta > 0 else 0)
  options = dict(num_steps=num_steps, eta=eta, prediction_type=prediction_type,
                 clip_sample=clip_sample, set_alpha_to_one=set_alpha_to_one, steps_offset=offset)
  keys = None if eta == 0 else keys
  got = _jitted("ddim", timestep_spacing="monai", **options)(x_T, keys)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if num_steps == 50:  # the rule matters: stepping between listed timesteps ends elsewhere
    between = _jitted("ddim", timestep_spacing="linspace", **options)(x_T, keys)
    assert float(jnp.max(jnp.abs(between - want))) > 1e-3


def test_monai_ddim_rule_lists_monai_timesteps_and_steps_by_t_over_n():
  ts, previous = diffusion.ddim_transitions(T, 50, "monai")
  np.testing.assert_array_equal(ts[:4], [999, 979, 958, 938])
  np.testing.assert_array_equal(previous[:4], [979, 959, 938, 918])
  assert previous[-1] == -20  # below 0: the scheduler's final alpha
  ts, previous = diffusion.ddim_transitions(T, 50, "leading")
  np.testing.assert_array_equal(previous, np.append(ts[1:], -1))


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m"])
def test_monai_ddim_rule_is_refused_by_other_samplers(sampler):
  schedule = diffusion.make_schedule(**PAPER)
  x_T, keys = _inputs()
  with pytest.raises(ValueError, match="sampling.timestep_spacing='monai'"):
    diffusion.sample(net_jax(schedule, "epsilon"), x_T, keys, schedule, sampler=sampler,
                     num_steps=10, timestep_spacing="monai")
