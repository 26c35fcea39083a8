"""Evaluation metrics: SSIM family (MONAI definitions), 4-G-R-SSIM, FID with Med3D features.

Submodules `ssim` and `fid` keep their names: SSIM itself is `metrics.ssim.ssim`, FID of two
volume sets is `compute_fid` (re-exporting functions named like the submodules would shadow them).
"""

from brain_ldm_jax.metrics.fid import FeatureExtractor
from brain_ldm_jax.metrics.fid import feature_statistics
from brain_ldm_jax.metrics.fid import compute_fid
from brain_ldm_jax.metrics.fid import fid_from_features
from brain_ldm_jax.metrics.fid import FIDResult
from brain_ldm_jax.metrics.fid import frechet_distance
from brain_ldm_jax.metrics.gr_ssim import four_g_r_ssim
from brain_ldm_jax.metrics.med3d import load_med3d
from brain_ldm_jax.metrics.med3d import Med3DResNet
from brain_ldm_jax.metrics.med3d import med3d_extractor
from brain_ldm_jax.metrics.med3d import med3d_features
from brain_ldm_jax.metrics.ssim import default_ms_ssim
from brain_ldm_jax.metrics.ssim import ms_ssim
from brain_ldm_jax.metrics.ssim import MS_SSIM_WEIGHTS
from brain_ldm_jax.metrics.ssim import pairwise_diversity
from brain_ldm_jax.metrics.ssim import pairwise_scores
from brain_ldm_jax.metrics.ssim import sample_pairs
