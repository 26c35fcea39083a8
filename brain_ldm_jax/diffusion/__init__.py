"""Diffusion core: schedules, the training objective, samplers and classifier-free guidance."""

from brain_ldm_jax.diffusion.guidance import NULL_COND
from brain_ldm_jax.diffusion.guidance import drop_conditions
from brain_ldm_jax.diffusion.guidance import guided
from brain_ldm_jax.diffusion.guidance import null_cond_like
from brain_ldm_jax.diffusion.losses import PREDICTION_TYPES
from brain_ldm_jax.diffusion.losses import denoising_loss
from brain_ldm_jax.diffusion.losses import diffusion_loss
from brain_ldm_jax.diffusion.losses import q_sample
from brain_ldm_jax.diffusion.losses import sample_timesteps
from brain_ldm_jax.diffusion.losses import training_target
from brain_ldm_jax.diffusion.samplers import SAMPLERS
from brain_ldm_jax.diffusion.samplers import ddim_sample
from brain_ldm_jax.diffusion.samplers import ddpm_sample
from brain_ldm_jax.diffusion.samplers import dpmpp_2m_sample
from brain_ldm_jax.diffusion.samplers import sample
from brain_ldm_jax.diffusion.samplers import step_noise
from brain_ldm_jax.diffusion.timesteps import TIMESTEP_SPACINGS
from brain_ldm_jax.diffusion.timesteps import ddim_timesteps
from brain_ldm_jax.diffusion.timesteps import ddim_transitions
from brain_ldm_jax.diffusion.schedules import SCHEDULES
from brain_ldm_jax.diffusion.schedules import Schedule
from brain_ldm_jax.diffusion.schedules import log_snr
from brain_ldm_jax.diffusion.schedules import make_schedule
from brain_ldm_jax.diffusion.schedules import schedule_from_config
