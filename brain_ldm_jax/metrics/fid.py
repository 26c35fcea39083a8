"""Fréchet distance between feature distributions (FID), float64 on the host.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

The trace term uses tr((S1 S2)^(1/2)) = tr((A S2 A)^(1/2)) with A = S1^(1/2): A S2 A is symmetric
positive semi-definite, so its square root comes from one symmetric eigen-decomposition
(eigenvalues clipped at 0 against rounding) instead of `scipy.linalg.sqrtm` on the non-symmetric
S1 S2, which can return complex parts and needs the ad-hoc "add eps to the diagonal" fix of the
usual implementation. Both are exact in exact arithmetic; for singular covariances (fewer
samples than features, common for 512-d Med3D features) the symmetric route stays real.

Feature extraction is pluggable (`FeatureExtractor`): every FID result carries the extractor's
name, so a number computed on, say, autoencoder latents is never mistaken for Med3D-FID.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses

import numpy as np
import scipy.linalg


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean (F,) and unbiased covariance (F, F) of features (N, F), in float64."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"features must be (N >= 2, F); got shape {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _clip_eigenvalues(w: np.ndarray) -> np.ndarray:
  """Zero eigenvalues below the usual rank tolerance (n eps max|w|).

  With fewer samples than features the covariances are singular; their zero eigenvalues come
  out as +-1e-16-ish rounding, and sqrt would turn each into ~1e-8 of spurious trace.
  """
  tol = w.size * np.finfo(np.float64).eps * max(np.abs(w).max(initial=0.0), 1e-300)
  return np.where(w > tol, w, 0.0)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (rounding-level eigenvalues -> 0)."""
  w, v = scipy.linalg.eigh((s + s.T) / 2)
  return (v * np.sqrt(_clip_eigenvalues(w))) @ v.T


def frechet_distance(mu1, s1, mu2, s2) -> float:
  """Fréchet distance between N(mu1, s1) and N(mu2, s2), float64."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
    raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
  a = _sqrt_psd(s1)
  m = a @ s2 @ a
  w = scipy.linalg.eigvalsh((m + m.T) / 2)
  tr_covmean = np.sqrt(_clip_eigenvalues(w)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
  """A named feature function: volumes (B, *spatial[, C]) -> features (B, F).

  `name` identifies the network and weights (e.g. "med3d_resnet10:resnet_10_23dataset.pth" or
  "autoencoder_latent_mean"); it is stored with every result computed from these features.
  """
  name: str
  fn: Callable[[np.ndarray], np.ndarray]
  batch_size: int = 4

  def __call__(self, volumes) -> np.ndarray:
    out = []
    for s in range(0, len(volumes), self.batch_size):
      out.append(np.asarray(self.fn(np.asarray(volumes[s:s + self.batch_size]))))
    return np.concatenate(out)


@dataclasses.dataclass(frozen=True)
class FIDResult:
  value: float
  extractor: str
  num_real: int
  num_generated: int


def fid_from_features(real_features, generated_features, extractor_name: str) -> FIDResult:
  """FID between two feature sets computed by the extractor `extractor_name`."""
  mu1, s1 = feature_statistics(real_features)
  mu2, s2 = feature_statistics(generated_features)
  return FIDResult(frechet_distance(mu1, s1, mu2, s2), extractor_name,
                   len(real_features), len(generated_features))


def compute_fid(real_volumes, generated_volumes, extractor: FeatureExtractor) -> FIDResult:
  """FID of two volume sets under `extractor` (see `med3d.med3d_extractor` for Med3D)."""
  return fid_from_features(extractor(real_volumes), extractor(generated_volumes), extractor.name)


__all__ = ["FIDResult", "FeatureExtractor", "compute_fid", "feature_statistics", "fid_from_features",
           "frechet_distance"]
