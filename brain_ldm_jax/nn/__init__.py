"""Flax networks of the latent diffusion model (MONAI-compatible) and weight conversion.

    ae = build_autoencoder(config.autoencoder)        # AutoencoderKL
    disc = build_discriminator(config.discriminator)  # PatchDiscriminator
    unet = build_unet(config.unet)                    # DiffusionModelUNet
    variables = init_variables(unet, key)
    x, context = hybrid_conditioning(z, covariates)
    eps = unet.apply(variables, x, t, context)
"""

from brain_ldm_jax.nn.autoencoder import AutoencoderKL
from brain_ldm_jax.nn.autoencoder import build_autoencoder
from brain_ldm_jax.nn.autoencoder import sample_latent
from brain_ldm_jax.nn.convert import abstract_variables
from brain_ldm_jax.nn.convert import flax_to_monai
from brain_ldm_jax.nn.convert import init_variables
from brain_ldm_jax.nn.convert import load_state_dict
from brain_ldm_jax.nn.convert import monai_to_flax
from brain_ldm_jax.nn.discriminator import PatchDiscriminator
from brain_ldm_jax.nn.discriminator import build_discriminator
from brain_ldm_jax.nn.unet import DiffusionModelUNet
from brain_ldm_jax.nn.unet import build_unet
from brain_ldm_jax.nn.unet import hybrid_conditioning

__all__ = [
    "AutoencoderKL", "DiffusionModelUNet", "PatchDiscriminator", "abstract_variables",
    "build_autoencoder", "build_discriminator", "build_unet", "flax_to_monai", "hybrid_conditioning",
    "init_variables", "load_state_dict", "monai_to_flax", "sample_latent",
]
