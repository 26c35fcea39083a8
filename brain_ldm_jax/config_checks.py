"""Every field of the shared config sections, checked once when a job starts.

`main` calls `check_config` on the parsed config before any data, device or compile work, so a
mistake ends as one `ConfigError` line that names the field, its value and what is allowed, not
as a shape error inside a network minutes later. The job-specific sections
(`generate`, `evaluate`, `reader_study`, `cohort`) are checked by their jobs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from brain_ldm_jax import networks
from brain_ldm_jax import presets
from brain_ldm_jax.diffusion import losses
from brain_ldm_jax.diffusion import samplers
from brain_ldm_jax.diffusion import schedules
from brain_ldm_jax.diffusion import timesteps
from brain_ldm_jax.errors import ConfigError
from brain_ldm_jax.train import state as state_lib

DTYPES = ("float32", "bfloat16")
LATENT_MODES = ("mean", "sample")
# What the `ldm` job can run; train/pipeline.py runs them in this order.
STAGES = ("autoencoder", "ldm", "samples", "summary")
CONV_BACKEND_HELP = ("the convolution backend is chosen once per process with "
                     "brain_ldm_jax.nn.ops.set_backend (the command line uses 'auto'): delete it")


def fail(field: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"{field}={value!r}: allowed {allowed}")


def _get(config, field: str):
  value = config
  for part in field.split("."):
    value = value[part]
  return value


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_at_least(config, field: str, low: int) -> None:
  value = _get(config, field)
  if not _is_int(value) or value < low:
    fail(field, value, f"an integer >= {low}")


def _number_in(config, field: str, low: float, high: float, *, open_low: bool = False,
               open_high: bool = False) -> None:
  value = _get(config, field)
  ok = _is_number(value) and (value > low if open_low else value >= low) and (
      value < high if open_high else value <= high)
  if not ok:
    fail(field, value, f"a number in {'(' if open_low else '['}{low:g}, {high:g}"
                       f"{')' if open_high else ']'}")


def _removed(config, field: str, instead: str) -> None:
  section, name = field.rsplit(".", 1)
  if name in _get(config, section):
    raise ConfigError(f"{field}={_get(config, field)!r}: no longer a config field; {instead}")


def _one_of(config, field: str, choices: Sequence) -> None:
  value = _get(config, field)
  if value not in choices:
    fail(field, value, "one of " + ", ".join(repr(c) for c in choices))


def _is_bool(config, field: str) -> None:
  value = _get(config, field)
  if not isinstance(value, bool):
    fail(field, value, "True or False")


def _per_level(config, field: str, levels: int, *, low: int) -> tuple[int, ...]:
  """An int for every level, or a sequence with one int per level (MONAI's convention)."""
  value = _get(config, field)
  values = (value,) * levels if _is_int(value) else tuple(value) if isinstance(
      value, (tuple, list)) else ()
  if len(values) != levels or not all(_is_int(v) and v >= low for v in values):
    fail(field, value, f"an integer >= {low} or {levels} of them (one per channels level)")
  return values


def _channels(config, section: str) -> tuple[int, ...]:
  field = f"{section}.channels"
  value = _get(config, field)
  groups = _get(config, f"{section}.norm_num_groups")
  if not _is_int(groups) or groups < 1:
    fail(f"{section}.norm_num_groups", groups, "an integer >= 1")
  if (not isinstance(value, (tuple, list)) or not value
      or not all(_is_int(c) and c >= 1 and c % groups == 0 for c in value)):
    fail(field, value, f"a non-empty tuple of multiples of {section}.norm_num_groups={groups}")
  levels = _get(config, f"{section}.attention_levels")
  if not isinstance(levels, (tuple, list)) or len(levels) != len(value):
    fail(f"{section}.attention_levels", levels,
         f"{len(value)} booleans (one per {section}.channels level)")
  return tuple(value)


def _network_common(config, section: str) -> None:
  _one_of(config, f"{section}.spatial_dims", (3,))
  _one_of(config, f"{section}.dtype", DTYPES)
  _removed(config, f"{section}.conv_impl", CONV_BACKEND_HELP)
  _is_bool(config, f"{section}.remat")
  _number_in(config, f"{section}.norm_eps", 0.0, 1.0, open_low=True, open_high=True)


def check_run(config) -> None:
  _one_of(config, "preset", presets.PRESETS)
  _int_at_least(config, "seed", 0)
  stages = config.stages
  if (not isinstance(stages, (tuple, list)) or not stages
      or any(s not in STAGES for s in stages)):
    fail("stages", stages, "a non-empty tuple of " + ", ".join(repr(s) for s in STAGES))


def check_data(config) -> None:
  covariates = config.data.covariates
  if (not isinstance(covariates, (tuple, list)) or not covariates
      or not all(isinstance(c, str) and c for c in covariates)
      or len(set(covariates)) != len(covariates)):
    fail("data.covariates", covariates, "a non-empty tuple of distinct participants.tsv columns")
  shape = config.data.shape
  factor = networks.downsampling_factor(config)
  if (not isinstance(shape, (tuple, list)) or len(shape) != 3
      or not all(_is_int(s) and s >= factor and s % factor == 0 for s in shape)):
    fail("data.shape", shape, f"3 positive multiples of {factor} (the autoencoder's "
                              "downsampling, 2 ** (len(autoencoder.channels) - 1))")
  _number_in(config, "data.spacing", 0.0, 100.0, open_low=True)
  clip = config.data.clip_percentiles
  if (not isinstance(clip, (tuple, list)) or len(clip) != 2
      or not all(_is_number(p) for p in clip) or not 0 <= clip[0] < clip[1] <= 100):
    fail("data.clip_percentiles", clip, "(low, high) with 0 <= low < high <= 100")
  _number_in(config, "data.val_fraction", 0.0, 1.0, open_high=True)
  _int_at_least(config, "data.split_seed", 0)
  _int_at_least(config, "data.num_workers", 0)
  _is_bool(config, "data.skip_bad_subjects")
  if "assume_mni" in config.data:
    _is_bool(config, "data.assume_mni")
  _int_at_least(config, "data.synthetic.num_subjects", 2)
  _int_at_least(config, "data.synthetic.seed", 0)
  _number_in(config, "data.synthetic.spacing", 0.0, 100.0, open_low=True)


def check_autoencoder(config) -> None:
  _network_common(config, "autoencoder")
  _one_of(config, "autoencoder.in_channels", (1,))  # one T1-weighted image per subject
  _one_of(config, "autoencoder.out_channels", (1,))
  channels = _channels(config, "autoencoder")
  _per_level(config, "autoencoder.num_res_blocks", len(channels), low=1)
  _int_at_least(config, "autoencoder.latent_channels", 1)
  _is_bool(config, "autoencoder.with_encoder_nonlocal_attn")
  _is_bool(config, "autoencoder.with_decoder_nonlocal_attn")


def check_discriminator(config) -> None:
  _one_of(config, "discriminator.spatial_dims", (3,))
  _one_of(config, "discriminator.in_channels", (1,))
  _one_of(config, "discriminator.out_channels", (1,))
  _int_at_least(config, "discriminator.num_layers_d", 1)
  _int_at_least(config, "discriminator.channels", 1)
  _removed(config, "discriminator.conv_impl", CONV_BACKEND_HELP)


def check_unet(config) -> None:
  _network_common(config, "unet")
  channels = _channels(config, "unet")
  levels = len(channels)
  _per_level(config, "unet.num_res_blocks", levels, low=1)
  heads = _per_level(config, "unet.num_head_channels", levels, low=0)
  for level, (c, attention, h) in enumerate(zip(channels, config.unet.attention_levels, heads)):
    # The middle block always has attention, so the last level needs heads too.
    if (attention or level == levels - 1) and (h <= 0 or c % h):
      fail("unet.num_head_channels", config.unet.num_head_channels,
           f"at level {level} (attention, {c} channels) a divisor of {c} that is >= 1")
  # The covariates always reach the UNet as channels and as a context token (hybrid conditioning).
  _one_of(config, "unet.with_conditioning", (True,))
  _one_of(config, "unet.num_class_embeds", (None,))
  _int_at_least(config, "unet.transformer_num_layers", 1)
  _is_bool(config, "unet.resblock_updown")
  _is_bool(config, "unet.upcast_attention")
  # The presets derive these; a value here that differs was set by hand.
  sizes = presets.network_sizes(config.data.covariates, config.autoencoder.latent_channels)
  for field, size in sizes.items():
    value = _get(config, field)
    if value != size:
      fail(field, value, f"{size}, which follows from data.covariates "
                         f"({len(config.data.covariates)}) and autoencoder.latent_channels "
                         f"({config.autoencoder.latent_channels}); leave it unset to follow them")


def check_diffusion(config) -> None:
  _int_at_least(config, "diffusion.num_train_timesteps", 1)
  _one_of(config, "diffusion.schedule", schedules.SCHEDULES)
  _number_in(config, "diffusion.beta_start", 0.0, 1.0, open_low=True, open_high=True)
  _number_in(config, "diffusion.beta_end", 0.0, 1.0, open_low=True, open_high=True)
  if config.diffusion.beta_end < config.diffusion.beta_start:
    fail("diffusion.beta_end", config.diffusion.beta_end,
         f"at least diffusion.beta_start={config.diffusion.beta_start}")
  _one_of(config, "diffusion.prediction_type", losses.PREDICTION_TYPES)
  _is_bool(config, "diffusion.clip_sample")


def check_guidance(guidance_scale: float, cond_drop_prob: float) -> None:
  """Guidance needs an unconditional model: one trained with condition dropout."""
  if guidance_scale != 1.0 and not cond_drop_prob > 0:
    raise ConfigError(
        f"sampling.guidance_scale={guidance_scale:g}: allowed only 1 for this run, which was "
        f"trained without condition dropout (train_ldm.cond_drop_prob={cond_drop_prob:g}), so it "
        "has no unconditional model to guide with; train with train_ldm.cond_drop_prob > 0 "
        "(e.g. 0.1) to use guidance")


def check_sampling_options(options: dict, config) -> None:
  """`api.sampling_options`'s result against the run's diffusion and training settings."""
  if options["sampler"] not in samplers.SAMPLERS:
    raise ConfigError(f"sampling.sampler={options['sampler']!r}: choose one of "
                      f"{', '.join(samplers.SAMPLERS)}")
  total = int(config.diffusion.num_train_timesteps)
  if not 1 <= options["num_steps"] <= total:
    raise ConfigError(f"sampling.num_steps={options['num_steps']} must be in [1, {total}] (the "
                      "run's diffusion.num_train_timesteps)")
  if not 0.0 <= options["eta"] <= 1.0:
    raise ConfigError(f"sampling.eta={options['eta']} must be in [0, 1]")
  if options["eta"] and options["sampler"] != "ddim":
    raise ConfigError(f"sampling.eta={options['eta']} only applies to the ddim sampler; "
                      f"{options['sampler']} needs eta=0")
  if not options["guidance_scale"] >= 0:
    fail("sampling.guidance_scale", options["guidance_scale"], "a number >= 0")
  # Runs from before the field existed had no dropout.
  check_guidance(options["guidance_scale"], float(config.train_ldm.get("cond_drop_prob", 0.0)))


def check_sampling(config) -> None:
  s = config.sampling
  for field in ("num_steps", "eta", "guidance_scale"):
    if not _is_number(s[field]):
      fail(f"sampling.{field}", s[field], "a number")
  check_sampling_options(dict(sampler=s.sampler, num_steps=s.num_steps, eta=float(s.eta),
                              guidance_scale=float(s.guidance_scale)), config)
  _one_of(config, "sampling.timestep_spacing", (None,) + timesteps.TIMESTEP_SPACINGS)
  _int_at_least(config, "sampling.num_samples", 0)
  _int_at_least(config, "sampling.seed", 0)
  if "sweep_covariates" in s:  # runs from before sweeps and the summary had neither field
    sweep = s.sweep_covariates
    if not isinstance(sweep, (tuple, list)) or not all(isinstance(n, str) for n in sweep):
      fail("sampling.sweep_covariates", sweep, "a tuple of covariate names, or () for no sweeps")
    _int_at_least(config, "sampling.sweep_values", 2)
  if "summary_samples" in s:
    _int_at_least(config, "sampling.summary_samples", 2)
    _int_at_least(config, "sampling.summary_calibration_subjects", 3)
    _one_of(config, "sampling.summary_sampler", samplers.SAMPLERS)
    _int_at_least(config, "sampling.summary_num_steps", 1)


def _check_training_loop(config, section: str) -> None:
  for name in ("batch_size", "num_steps", "log_every", "image_every", "checkpoint_every",
               "keep_checkpoints"):
    _int_at_least(config, f"{section}.{name}", 1)
  _number_in(config, f"{section}.learning_rate", 0.0, 1e38, open_low=True)
  _one_of(config, f"{section}.lr_schedule", state_lib.LR_SCHEDULES)
  if "lr_decay_fraction" in config[section]:  # runs made before it existed lack it
    _number_in(config, f"{section}.lr_decay_fraction", 0.0, 1.0, open_low=True)


def check_train_ae(config) -> None:
  _check_training_loop(config, "train_ae")
  _number_in(config, "train_ae.disc_learning_rate", 0.0, 1e38, open_low=True)
  for name in ("kl_weight", "adv_weight", "perceptual_weight"):
    _number_in(config, f"train_ae.{name}", 0.0, 1e38)
  _int_at_least(config, "train_ae.adv_start_step", 0)
  if "clip_reconstruction" in config.train_ae:
    _is_bool(config, "train_ae.clip_reconstruction")
  patch = config.train_ae.get("patch_shape")
  factor = networks.downsampling_factor(config)
  if patch is not None and (
      not isinstance(patch, (tuple, list)) or len(patch) != 3
      or not all(_is_int(p) and factor <= p <= n and p % factor == 0
                 for p, n in zip(patch, config.data.shape))):
    fail("train_ae.patch_shape", patch,
         f"unset (whole images) or 3 multiples of {factor} (the autoencoder's downsampling), "
         f"each at most data.shape={tuple(config.data.shape)}")
  path = config.train_ae.perceptual_weights_path
  if path and not os.path.isfile(path):
    fail("train_ae.perceptual_weights_path", path,
         "an existing MedicalNet .pth file (or empty: no perceptual loss)")


def check_train_ldm(config) -> None:
  _check_training_loop(config, "train_ldm")
  _number_in(config, "train_ldm.weight_decay", 0.0, 1e38)
  _number_in(config, "train_ldm.ema_decay", 0.0, 1.0)
  _number_in(config, "train_ldm.cond_drop_prob", 0.0, 1.0)
  _one_of(config, "train_ldm.latent", LATENT_MODES)
  _is_bool(config, "train_ldm.cache_latents")
  setting = config.train_ldm.scale_factor
  try:
    ok = setting == "std" or float(setting) > 0
  except (TypeError, ValueError):
    ok = False
  if not ok:
    fail("train_ldm.scale_factor", setting, "'std' or a positive number such as '1.0'")


def check_mesh(config) -> None:
  data = config.mesh.data
  if not _is_int(data) or not (data == -1 or data >= 1):
    fail("mesh.data", data, "-1 (every device fsdp leaves) or an integer >= 1")
  _int_at_least(config, "mesh.fsdp", 1)
  _int_at_least(config, "mesh.fsdp_min_size", 1)


# In this order: each check may read fields that an earlier one has checked.
CHECKS = {"autoencoder": check_autoencoder, "discriminator": check_discriminator,
          "data": check_data, "unet": check_unet,
          "diffusion": check_diffusion, "train_ldm": check_train_ldm, "sampling": check_sampling,
          "train_ae": check_train_ae, "mesh": check_mesh}


def check_config(config) -> None:
  """Raises a ConfigError naming the first field whose value cannot work."""
  check_run(config)
  for section, check in CHECKS.items():
    check(config)
