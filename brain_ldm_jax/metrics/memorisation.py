"""Memorisation audit: is any generated brain a near-copy of a training subject?

For each generated brain we find its nearest training subject twice:

- in the autoencoder's latent space: the posterior mean of the (frozen) encoder, flattened, with
  L2 distance (the geometry the diffusion model was trained in) and cosine distance (insensitive to
  a global latent scale) reported side by side;
- by image SSIM (`metrics.ssim.ssim`, MONAI's definition) against the training volumes. SSIM of
  every generated/training pair costs N_gen x N_train full-resolution SSIMs; with
  `ssim_candidates = k > 0` only each query's k latent-nearest training subjects are scored (a
  copy in image space is a copy in latent space too, so the latent shortlist loses no copies).

The same is done for real held-out subjects (each validation subject's nearest training subject):
that "real-vs-real" distribution says how close two *different* people of this cohort come.

Flagging rule (documented in the report). A generated brain is a near-copy when

    latent L2 distance to its nearest training subject  <  P_q(real-vs-real latent L2 distances)
  or
    SSIM to its nearest training subject  >  P_(100-q)(real-vs-real nearest-neighbour SSIMs)

with q = `percentile` (1 by default): it is closer to a training subject than all but q % of real
unseen people are to theirs. With few validation subjects P_1 / P_99 approach the minimum /
maximum. A cohort with duplicate scans (real-vs-real distance 0, SSIM 1) disables the rule; the
report shows the thresholds so a reader sees that.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from brain_ldm_jax.errors import DataError
from brain_ldm_jax.metrics import ssim as ssim_lib

METRICS = ("l2", "cosine")
# One object, so every call of `pairwise_scores` hits the same jit cache entry.
_SSIM_3D = functools.partial(ssim_lib.ssim, spatial_dims=3)


# ----------------------------------------------------------------------------- latent features


def latent_features_fn(autoencoder) -> Callable:
  """Jitted (ae_params, volumes (B, X, Y, Z)) -> flattened posterior means (B, F)."""

  @jax.jit
  def features(ae_params, volumes):
    mean, _ = autoencoder.apply({"params": ae_params}, volumes[..., None], method="encode")
    return mean.reshape(mean.shape[0], -1)

  return features


def latent_features(autoencoder, ae_params, volumes, batch_size: int = 4) -> np.ndarray:
  """Posterior means (N, F) of volumes (N, X, Y, Z), fixed-size batches (last one padded).

  `volumes` only needs len() and integer indexing, so a lazy on-disk list works as well.
  """
  fn = latent_features_fn(autoencoder)
  out = []
  n = len(volumes)
  for s in range(0, n, batch_size):
    chunk = np.stack([np.asarray(volumes[i], np.float32) for i in range(s, min(n, s + batch_size))])
    k = len(chunk)
    if k < batch_size:  # pad by repetition so the encoder compiles once
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - k, axis=0)])
    out.append(np.asarray(fn(ae_params, jnp.asarray(chunk)))[:k])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


# ----------------------------------------------------------------------------- distances


@functools.partial(jax.jit, static_argnames=("metric",))
def pairwise_distances(queries: jax.Array, references: jax.Array, metric: str = "l2") -> jax.Array:
  """(Q, R) distances between feature rows: Euclidean ('l2') or 1 - cosine similarity ('cosine').

  L2 uses |q|^2 + |r|^2 - 2 q.r in float32 with the square clipped at 0: an exact copy gives 0 up
  to rounding (~1e-3 of |q| at most), far below any real-vs-real distance.
  """
  q = jnp.asarray(queries, jnp.float32)
  r = jnp.asarray(references, jnp.float32)
  if metric == "l2":
    sq = (q * q).sum(1)[:, None] + (r * r).sum(1)[None, :] - 2.0 * q @ r.T
    return jnp.sqrt(jnp.maximum(sq, 0.0))
  if metric == "cosine":
    qn = q / jnp.maximum(jnp.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    rn = r / jnp.maximum(jnp.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    return 1.0 - qn @ rn.T
  raise ValueError(f"metric {metric!r}: use one of {METRICS}")


def nearest(queries, references, metric: str = "l2") -> tuple[np.ndarray, np.ndarray]:
  """(distance (Q,), index (Q,)) of each query's nearest reference row."""
  d = np.asarray(pairwise_distances(jnp.asarray(queries), jnp.asarray(references), metric))
  idx = d.argmin(axis=1)
  return d[np.arange(len(d)), idx], idx


class _Concat:
  """Integer-indexable view of two sequences, end to end (queries then references)."""

  def __init__(self, a, b):
    self.a, self.b = a, b

  def __len__(self):
    return len(self.a) + len(self.b)

  def __getitem__(self, i):
    return self.a[i] if i < len(self.a) else self.b[i - len(self.a)]


def nearest_by_ssim(queries, references, candidates: np.ndarray | None = None,
                    batch_size: int = 4) -> tuple[np.ndarray, np.ndarray]:
  """(best SSIM (Q,), index (Q,)) of each query volume against reference volumes.

  Args:
    queries, references: (N, X, Y, Z) volumes (arrays or lazy integer-indexable lists).
    candidates: optional (Q, K) reference indices per query to score; default all references.
    batch_size: pairs per jitted SSIM call.
  """
  nq, nr = len(queries), len(references)
  if candidates is None:
    candidates = np.broadcast_to(np.arange(nr), (nq, nr))
  candidates = np.asarray(candidates, np.int64)
  rows = np.repeat(np.arange(nq), candidates.shape[1])
  pairs = np.stack([rows, nq + candidates.reshape(-1)], axis=1)
  scores = ssim_lib.pairwise_scores(_Concat(queries, references), pairs, _SSIM_3D,
                                    batch_size).reshape(candidates.shape)
  best = scores.argmax(axis=1)
  return scores[np.arange(nq), best], candidates[np.arange(nq), best]


# ----------------------------------------------------------------------------- audit


@dataclasses.dataclass(frozen=True)
class NearestNeighbours:
  """Each query's nearest training subject under every criterion."""
  l2: np.ndarray  # (Q,) latent L2 distance
  l2_index: np.ndarray
  cosine: np.ndarray  # (Q,) latent cosine distance
  cosine_index: np.ndarray
  ssim: np.ndarray  # (Q,) best image SSIM
  ssim_index: np.ndarray


def find_neighbours(query_features, train_features, query_volumes, train_volumes,
                    ssim_candidates: int = 0, batch_size: int = 4) -> NearestNeighbours:
  """Nearest training subjects of each query by latent L2, latent cosine and image SSIM."""
  if len(train_features) == 0:
    raise DataError("memorisation audit: no training subjects to compare with")
  q = jnp.asarray(query_features)
  t = jnp.asarray(train_features)
  d_l2 = np.asarray(pairwise_distances(q, t, "l2"))
  d_cos = np.asarray(pairwise_distances(q, t, "cosine"))
  ar = np.arange(len(d_l2))
  i_l2, i_cos = d_l2.argmin(1), d_cos.argmin(1)
  candidates = None
  if 0 < ssim_candidates < len(train_features):
    candidates = np.argsort(d_l2, axis=1)[:, :ssim_candidates]
  s, i_s = nearest_by_ssim(query_volumes, train_volumes, candidates, batch_size)
  return NearestNeighbours(l2=d_l2[ar, i_l2], l2_index=i_l2, cosine=d_cos[ar, i_cos],
                           cosine_index=i_cos, ssim=s, ssim_index=i_s)


@dataclasses.dataclass(frozen=True)
class FlagRule:
  """Thresholds from the real-vs-real distribution (see the module docstring)."""
  percentile: float
  l2_below: float  # flag when the generated NN latent L2 distance is below this
  ssim_above: float  # flag when the generated NN SSIM is above this

  def flags(self, nn: NearestNeighbours) -> tuple[np.ndarray, np.ndarray]:
    """(flag by latent L2 (Q,), flag by SSIM (Q,)) booleans."""
    return nn.l2 < self.l2_below, nn.ssim > self.ssim_above

  def describe(self) -> str:
    q = self.percentile
    return (f"near-copy if latent L2 to the nearest training subject < {self.l2_below:.4g} "
            f"(P{q:g} of real-vs-real) or its SSIM > {self.ssim_above:.4f} "
            f"(P{100 - q:g} of real-vs-real)")


def flag_rule(real: NearestNeighbours, percentile: float = 1.0) -> FlagRule:
  """Thresholds from the real held-out subjects' nearest-training-subject distances."""
  if len(real.l2) == 0:
    raise DataError("memorisation audit: no real held-out subjects to set the thresholds")
  if not 0.0 <= percentile < 50.0:
    raise ValueError(f"percentile={percentile}: use a value in [0, 50)")
  return FlagRule(percentile=float(percentile),
                  l2_below=float(np.percentile(real.l2, percentile)),
                  ssim_above=float(np.percentile(real.ssim, 100.0 - percentile)))


def _summary(x: np.ndarray) -> dict:
  x = np.asarray(x, np.float64)
  if x.size == 0:
    return {}
  p = np.percentile(x, [1, 5, 50, 95, 99])
  return dict(n=int(x.size), min=float(x.min()), p1=float(p[0]), p5=float(p[1]),
              median=float(p[2]), p95=float(p[3]), p99=float(p[4]), max=float(x.max()),
              mean=float(x.mean()))


def audit(generated: NearestNeighbours, real: NearestNeighbours, percentile: float = 1.0,
          train_ids: Sequence[str] | None = None) -> dict:
  """The audit as JSON-ready data: distributions, the rule, and every generated brain's row."""
  rule = flag_rule(real, percentile)
  by_l2, by_ssim = rule.flags(generated)
  ids = (lambda i: str(train_ids[int(i)])) if train_ids is not None else int
  rows = []
  for k in range(len(generated.l2)):
    rows.append(dict(
        sample=k, nearest_l2=ids(generated.l2_index[k]), l2=float(generated.l2[k]),
        nearest_cosine=ids(generated.cosine_index[k]), cosine=float(generated.cosine[k]),
        nearest_ssim=ids(generated.ssim_index[k]), ssim=float(generated.ssim[k]),
        flagged=bool(by_l2[k] or by_ssim[k]), flagged_by=[n for n, f in (("latent_l2", by_l2[k]),
                                                                          ("ssim", by_ssim[k])) if f]))
  flagged = by_l2 | by_ssim
  return dict(
      rule=rule.describe(), percentile=rule.percentile, l2_threshold=rule.l2_below,
      ssim_threshold=rule.ssim_above,
      num_generated=int(len(generated.l2)), num_real=int(len(real.l2)),
      num_flagged=int(flagged.sum()), flagged_fraction=float(flagged.mean()) if flagged.size else 0.0,
      generated=dict(l2=_summary(generated.l2), cosine=_summary(generated.cosine),
                     ssim=_summary(generated.ssim)),
      real_vs_real=dict(l2=_summary(real.l2), cosine=_summary(real.cosine),
                        ssim=_summary(real.ssim)),
      samples=rows)


__all__ = ["FlagRule", "METRICS", "NearestNeighbours", "audit", "find_neighbours", "flag_rule",
           "latent_features", "latent_features_fn", "nearest", "nearest_by_ssim",
           "pairwise_distances"]
