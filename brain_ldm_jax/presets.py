"""Named configurations: `paper` (the published model), `demo` (a CPU in minutes), `demo_long`
(the demo trained longer, for sharper brains), `test` (tiny).

Every job config in `configs/` starts from `base_config(preset)` so that all jobs agree on the data,
the networks and the diffusion process of a run. Network sections use MONAI's argument names, so a
section maps one-to-one onto the MONAI constructor and onto our Flax module.
"""

from __future__ import annotations

import functools

import ml_collections
from ml_collections import config_dict

from brain_ldm_jax.errors import ConfigError

PRESETS = ("demo", "demo_long", "paper", "test")
# Presets that are another preset with a longer schedule: (base preset, {dotted field: value}).
_LONGER = {
    # About 40 min of training on a 2-core CPU instead of the demo's 15: both stages train ~3x
    # longer (ventricles r 0.94, autoencoder SSIM 0.93; README), and the LDM's weight average
    # spans more steps. Its autoencoder keeps the recipe it was measured with: the adversarial
    # term from step 0, a constant rate, the raw L1.
    "demo_long": ("demo", {"train_ae.num_steps": 6000, "train_ae.checkpoint_every": 1000,
                           "train_ae.image_every": 1000, "train_ae.adv_weight": 1e-2,
                           "train_ae.lr_schedule": "constant",
                           "train_ae.clip_reconstruction": False,
                           "train_ldm.num_steps": 4500, "train_ldm.ema_decay": 0.995,
                           "train_ldm.checkpoint_every": 500, "train_ldm.image_every": 1500}),
}
COVARIATES = ("age", "sex", "ventricular_volume", "brain_volume")
# "Not given" is spelled one way in every config: `config_dict.placeholder(TYPE)`, None until set.
# The field keeps its type, so ml_collections parses `--config.a.b=VALUE` as that type (a bare
# None field cannot be overridden from the command line at all); None is never a real value, as
# "" or 0 can be; config.json shows it as null. Code reads such a field as `value or default`.


def _data(preset: str) -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  # Unset data_dir: the job makes (or reuses) the synthetic cohort in <workdir>/cohort.
  d.data_dir = config_dict.placeholder(str)
  d.participants_tsv = config_dict.placeholder(str)  # default: <data_dir>/participants.tsv
  # A column with image paths; default: BIDS sub-*/anat/*_T1w.nii*
  d.image_column = config_dict.placeholder(str)
  d.covariates = COVARIATES
  d.shape = {"paper": (160, 224, 160), "demo": (40, 56, 40), "test": (32, 32, 32)}[preset]
  d.spacing = {"paper": 1.0, "demo": 4.0, "test": 4.0}[preset]
  d.clip_percentiles = (0.5, 99.5)
  d.val_fraction = 0.1
  d.split_seed = 0
  d.num_workers = {"paper": 8, "demo": 0, "test": 0}[preset]
  d.skip_bad_subjects = False
  # Images that plainly are not in MNI space are refused (nifti.mni_problem); True loads them as
  # they are, placed by their affine.
  d.assume_mni = False
  # The synthetic cohort made when data_dir is empty.
  d.synthetic = ml_collections.ConfigDict()
  d.synthetic.num_subjects = {"paper": 512, "demo": 64, "test": 12}[preset]
  d.synthetic.seed = 0
  d.synthetic.spacing = d.spacing
  return d


def _autoencoder(preset: str) -> ml_collections.ConfigDict:
  a = ml_collections.ConfigDict()
  a.spatial_dims = 3
  a.in_channels = 1
  a.out_channels = 1
  a.channels = {"paper": (64, 128, 128, 128), "demo": (16, 32, 32), "test": (8, 16)}[preset]
  a.num_res_blocks = {"paper": 2, "demo": 1, "test": 1}[preset]
  a.attention_levels = (False,) * len(a.channels)
  # The paper's 3 latent channels; the demo's 8 reconstructed its validation brains at SSIM 0.81
  # instead of 0.76 after the same 450 whole-image steps (the earlier, noisier cohort;
  # docs/summary.md), at no measurable cost to the LDM; 16 did worse.
  a.latent_channels = {"paper": 3, "demo": 8, "test": 3}[preset]
  a.norm_num_groups = {"paper": 32, "demo": 8, "test": 4}[preset]
  a.norm_eps = 1e-6
  a.with_encoder_nonlocal_attn = False
  a.with_decoder_nonlocal_attn = False
  a.remat = preset == "paper"
  a.dtype = "float32"  # compute dtype; params stay float32 ("bfloat16" on accelerators)
  return a


def _discriminator(preset: str) -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.spatial_dims = 3
  d.in_channels = 1
  d.out_channels = 1
  d.num_layers_d = {"paper": 3, "demo": 2, "test": 2}[preset]
  d.channels = {"paper": 32, "demo": 16, "test": 8}[preset]
  return d


def _unet(preset: str) -> ml_collections.ConfigDict:
  u = ml_collections.ConfigDict()
  u.spatial_dims = 3
  # The latent plus one broadcast channel per covariate; like out_channels and
  # cross_attention_dim a function of data.covariates and autoencoder.latent_channels, which
  # base_config sets (network_sizes).
  u.in_channels = config_dict.placeholder(int)
  u.out_channels = config_dict.placeholder(int)
  # The demo's latent is 10x14x10 (x4 downsampling): two levels, attention on 5x7x5.
  u.channels = {"paper": (256, 512, 768), "demo": (32, 64), "test": (8, 16, 16)}[preset]
  u.num_res_blocks = {"paper": 2, "demo": 2, "test": 1}[preset]
  u.attention_levels = {"paper": (False, True, True), "demo": (False, True),
                        "test": (False, True, True)}[preset]
  u.num_head_channels = {"paper": (0, 512, 768), "demo": (0, 32), "test": (0, 8, 8)}[preset]
  u.norm_num_groups = {"paper": 32, "demo": 8, "test": 4}[preset]
  u.norm_eps = 1e-6
  u.resblock_updown = True
  u.with_conditioning = True
  u.transformer_num_layers = 1
  u.cross_attention_dim = config_dict.placeholder(int)  # the covariates as one context token
  u.num_class_embeds = config_dict.placeholder(int)  # unset: no class embedding (MONAI's None)
  u.upcast_attention = True
  u.remat = preset == "paper"
  u.dtype = "float32"
  return u


def _diffusion(preset: str) -> ml_collections.ConfigDict:
  f = ml_collections.ConfigDict()
  f.num_train_timesteps = 1000
  f.schedule = "scaled_linear_beta"
  f.beta_start = 0.0015
  f.beta_end = 0.0205
  # The paper's model predicts ε. The demo predicts v: ε's loss barely weights the high-noise
  # steps, where only the covariates can tell the anatomy, so a short run learns to ignore them
  # (ventricle r 0.10 with ε, 0.54 with v at 900 steps, on the earlier cohort; docs/summary.md).
  f.prediction_type = {"paper": "epsilon", "demo": "v_prediction", "test": "epsilon"}[preset]
  f.clip_sample = False
  return f


def _sampling(preset: str) -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.sampler = "ddim"  # ddpm | ddim | dpmpp_2m
  s.num_steps = {"paper": 50, "demo": 50, "test": 5}[preset]
  s.eta = 0.0
  # Unset: each sampler's own default: leading for DDIM (MONAI GenerativeModels, which made the
  # paper's model), linspace for DDPM, quadratic for DPM-Solver++.
  s.timestep_spacing = config_dict.placeholder(str)
  s.guidance_scale = 1.0  # 1.0: no classifier-free guidance, one network call per step
  s.num_samples = {"paper": 4, "demo": 4, "test": 2}[preset]
  s.seed = 0
  # Counterfactual sweeps of the samples stage: one noise, one covariate over its training range
  # in `sweep_values` steps, the others at the training subjects' medians.
  s.sweep_covariates = ("ventricular_volume", "age", "brain_volume")
  s.sweep_values = {"paper": 5, "demo": 5, "test": 2}[preset]
  # The summary stage: N brains for covariates drawn from the training cohort, measured. The
  # fast sampler keeps it cheap (DPM-Solver++(2M)-20 is as accurate as DDIM-50 here).
  s.summary_samples = {"paper": 64, "demo": 64, "test": 3}[preset]
  s.summary_sampler = "dpmpp_2m"
  s.summary_num_steps = {"paper": 20, "demo": 20, "test": 2}[preset]
  s.summary_calibration_subjects = {"paper": 300, "demo": 60, "test": 8}[preset]
  return s


def _train_ae(preset: str) -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.batch_size = {"paper": 8, "demo": 2, "test": 2}[preset]  # global
  # The demo's autoencoder bounds every sample's sharpness. On 24x32x24 crops (below) a step costs
  # a fifth of a whole 40x56x40 image's; 2,400 of them, the last quarter at a cosine-decaying
  # rate, reconstruct the validation brains at SSIM 0.92 (seeds 0 and 1) in about the time 450
  # whole-image steps reach 0.84 (docs/summary.md).
  t.num_steps = {"paper": 200_000, "demo": 2400, "test": 4}[preset]
  t.learning_rate = {"paper": 1e-4, "demo": 1e-3, "test": 1e-4}[preset]
  # "cosine": decayed to 0 over the last lr_decay_fraction of num_steps. The demo's decay settles
  # what a constant rate leaves wandering, the brain's detail and the background's level
  # (docs/summary.md).
  t.lr_schedule = {"paper": "constant", "demo": "cosine", "test": "constant"}[preset]
  t.lr_decay_fraction = {"paper": 1.0, "demo": 0.25, "test": 1.0}[preset]
  # Unset: whole images; a shape trains both networks on one random crop of each image.
  t.patch_shape = {"paper": config_dict.placeholder(tuple), "demo": (24, 32, 24),
                   "test": config_dict.placeholder(tuple)}[preset]
  # L1 of the clipped reconstruction, the image every consumer sees; the paper's (MONAI's) L1 is of
  # the raw decoder output. Clipped, the demo's background costs nothing at or below 0, and its
  # seed-1 autoencoder reads SSIM 0.92 instead of 0.89 (SSIM punishes any positive offset on the
  # near-zero background; docs/summary.md).
  t.clip_reconstruction = {"paper": False, "demo": True, "test": False}[preset]
  t.disc_learning_rate = 1e-4
  t.kl_weight = 1e-6
  # 0: no discriminator at all. The demo's adversarial term bought no SSIM in the brain and cost
  # a tenth to a sixth of each step (docs/summary.md).
  t.adv_weight = {"paper": 1e-2, "demo": 0.0, "test": 1e-2}[preset]
  t.adv_start_step = {"paper": 10_000, "demo": 0, "test": 2}[preset]
  t.perceptual_weight = 1e-3
  # The pretrained feature network; unset: no perceptual loss.
  t.perceptual_weights_path = config_dict.placeholder(str)
  t.log_every = {"paper": 100, "demo": 100, "test": 1}[preset]
  t.image_every = {"paper": 5000, "demo": 600, "test": 4}[preset]
  t.checkpoint_every = {"paper": 5000, "demo": 600, "test": 2}[preset]
  t.keep_checkpoints = 3
  return t


def _train_ldm(preset: str) -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.batch_size = {"paper": 32, "demo": 6, "test": 2}[preset]
  # The demo's ventricles follow their covariate only late: r 0.56 after 900 steps, 0.80 after
  # 1800, on the earlier cohort (docs/summary.md).
  t.num_steps = {"paper": 200_000, "demo": 1800, "test": 4}[preset]
  t.learning_rate = {"paper": 2.5e-5, "demo": 5e-4, "test": 1e-3}[preset]
  t.lr_schedule = "constant"  # or "cosine": decayed to 0 over num_steps
  t.lr_decay_fraction = 1.0  # with "cosine": the decay spans this last fraction of num_steps
  t.weight_decay = 0.0
  t.ema_decay = {"paper": 0.9999, "demo": 0.99, "test": 0.9}[preset]
  t.cond_drop_prob = 0.0  # > 0 trains for classifier-free guidance
  t.latent = "mean"  # mean | sample of the frozen encoder's posterior
  # Encode the training set once (exact: the encoder is frozen) instead of every step. Needs the
  # posteriors of all training subjects in host memory: off for the paper's 31k subjects.
  t.cache_latents = preset != "paper"
  t.scale_factor = "std"  # "std": 1/std of training latents (MONAI tutorial); or a number, e.g. "1.0"
  t.log_every = {"paper": 100, "demo": 50, "test": 1}[preset]
  t.image_every = {"paper": 5000, "demo": 1000, "test": 4}[preset]
  t.checkpoint_every = {"paper": 5000, "demo": 300, "test": 2}[preset]
  t.keep_checkpoints = 3
  return t


def _mesh() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.data = -1  # -1: every device not used by the other axes
  m.fsdp = 1
  # Parameters with at least this many elements are sharded over `fsdp`.
  m.fsdp_min_size = 2**18
  return m


def base_config(preset: str | None) -> ml_collections.ConfigDict:
  """The run configuration shared by every job; `preset` is one of PRESETS (or None: demo)."""
  preset = parse_preset(preset)
  base, longer = _LONGER.get(preset, (preset, {}))
  c = _preset_config(base)
  c.preset = preset
  for field, value in longer.items():
    section, name = field.split(".")
    c[section][name] = value
  return c


def _preset_config(preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "ldm"
  c.preset = preset
  c.seed = 0
  # What the `ldm` job runs, in order; e.g. ("autoencoder",) trains only the first stage.
  c.stages = ("autoencoder", "ldm", "samples", "summary")
  c.data = _data(preset)
  c.autoencoder = _autoencoder(preset)
  c.discriminator = _discriminator(preset)
  c.unet = _unet(preset)
  c.diffusion = _diffusion(preset)
  c.sampling = _sampling(preset)
  c.train_ae = _train_ae(preset)
  c.train_ldm = _train_ldm(preset)
  c.mesh = _mesh()
  _derive_network_sizes(c)
  return c


def network_sizes(covariates, latent_channels: int) -> dict[str, int]:
  """The UNet sizes that follow from the covariates and the autoencoder's latent channels."""
  n = len(covariates)
  return {"unet.in_channels": latent_channels + n,  # the latent + one channel per covariate
          "unet.out_channels": latent_channels,
          "unet.cross_attention_dim": n}  # the covariates as one context token


def _network_size(field: str, _unused, covariates, latent_channels: int) -> int:
  return network_sizes(covariates, latent_channels)[field]


def _derive_network_sizes(c: ml_collections.ConfigDict) -> None:
  """Makes the UNet's covariate-dependent sizes lazy functions of data.covariates and
  autoencoder.latent_channels, so any config with other covariates (an override, a test, a
  script) gets matching networks without touching the unet section. A size the user sets
  replaces its function; config_checks then requires it to agree."""
  inputs = [c.data.get_ref("covariates"), c.autoencoder.get_ref("latent_channels")]
  for field in network_sizes(COVARIATES, 0):
    # ml_collections' own lazy computation (what `ref + 1` builds), here of two fields at once,
    # which its operators cannot express. A module-level function keeps the config picklable.
    size = functools.partial(_network_size, field)
    op = config_dict.config_dict._Op(size, inputs)  # pylint: disable=protected-access
    section, name = field.split(".")
    c[section][name] = config_dict.FieldReference(0, field_type=int, op=op)


def parse_preset(arg: str | None, default: str = "demo") -> str:
  """The preset named in a config string's argument (`configs/ldm.py:paper` -> "paper")."""
  preset = (arg or default).strip()
  if preset not in PRESETS:
    raise ConfigError(f"preset={preset!r}: allowed one of {', '.join(PRESETS)} "
                      "(e.g. --config=configs/ldm.py:paper)")
  return preset
