r"""Counterfactuals of real subjects: the same brain with other covariates, by DDIM inversion.

    from brain_ldm_jax import api, counterfactual
    run = api.load_run("runs/demo")
    edit = counterfactual.make_editor(run, num_steps=50)          # strength=1.0: all the way
    older = edit(run.params, images, cond, dict(cond, age=np.add(cond["age"], 10)))  # (B, X, Y, Z)
    invert = counterfactual.make_inverter(run, num_steps=50)
    noise = invert(run.params, images, cond)   # what DDIM (eta 0) regenerates the subjects from

`images` are (B, X, Y, Z) in [0, 1] on the run's grid (`nifti.load_volume(path, data.shape,
data.spacing, data.clip_percentiles)`), covariates in natural units as for `api.make_sampler`.
The autoencoder encodes each image (posterior mean x scale factor), `diffusion.inversion` walks the
latent up the sampler's own DDIM timesteps under the subject's covariates and back down under the
new ones, and the autoencoder decodes. Everything is deterministic (eta = 0: no noise, no keys),
and each subject runs through the same batch-1 program (`lax.map`, as `api.images_fn`), so a batch
of B gives bitwise the results of B runs of one.

Guidance: with a guidance scale != 1 (the run's `sampling.guidance_scale` or the one given), both
directions use the guided prediction; `api.sampling_options` refuses that for runs trained
without condition dropout. Plain DDIM inversion is used, not null-text inversion (Mokady et al.
2023): the paper's model samples without guidance, where DDIM inversion is already the sampler's
inverse up to its O(1/N) discretisation error, and null-text inversion would add a per-subject
optimisation through the UNet (hundreds of network gradients) to repair what only guidance breaks.

The job that edits a cohort and writes the images, tables and figures is jobs/counterfactual.py
(docs/counterfactual.md).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from brain_ldm_jax import api
from brain_ldm_jax import charts
from brain_ldm_jax import generate
from brain_ldm_jax import networks
from brain_ldm_jax.data import manifest
from brain_ldm_jax.diffusion import guidance
from brain_ldm_jax.diffusion import inversion
from brain_ldm_jax.diffusion import schedules
from brain_ldm_jax.errors import ConfigError, DataError
from brain_ldm_jax.metrics import volumes as volumes_lib
from brain_ldm_jax.nn import autoencoder as autoencoder_lib
from brain_ldm_jax.nn import ops
from brain_ldm_jax.nn import unet as unet_lib

OUTPUTS = ("autoencoder", "reconstruction", "edited")
REGIONS = ("ventricle_region", "rest_of_brain")

# ----------------------------------------------------------------------------------------------
# Pure programs


def edit_options(run: api.Run, *, num_steps: int | None = None,
                 guidance_scale: float | None = None, strength: float = 1.0) -> dict:
  """Validated settings: the run's DDIM steps and guidance unless given; `strength` in (0, 1]."""
  options = api.sampling_options(run, sampler="ddim", num_steps=num_steps, eta=0.0,
                                 guidance_scale=guidance_scale)
  inversion.num_edit_steps(options["num_steps"], strength)
  return dict(num_steps=options["num_steps"], guidance_scale=options["guidance_scale"],
              strength=float(strength))


def _ddim_options(config, num_steps: int, strength: float) -> dict:
  return dict(num_steps=num_steps, strength=strength,
              prediction_type=config.diffusion.prediction_type,
              clip_sample=bool(config.diffusion.clip_sample),
              timestep_spacing=generate.timestep_spacing(config, "ddim"))


def counterfactual_fn(run: api.Run, *, num_steps: int, guidance_scale: float, strength: float,
                      outputs: Sequence[str] = OUTPUTS) -> Callable:
  """Pure, un-jitted `(params, images, cond_from, cond_to) -> {output: (B, ...)}`, per sample.

  images (B, X, Y, Z) in [0, 1]; covariates (B, n) normalised. Outputs (any of):
    "noise": the inverted latent (B, *latent_shape), at timestep `inversion.edit_timesteps(...)[0]`;
    "autoencoder": the autoencoder's own reconstruction (decoded posterior mean);
    "reconstruction": inverted and regenerated under cond_from (the edit with no change);
    "edited": inverted under cond_from, regenerated under cond_to.
  Images come back in [0, 1]. Each sample runs through the batch-1 program (`lax.map`).
  """
  config = run.config
  autoencoder = autoencoder_lib.build_autoencoder(config.autoencoder)
  unet = unet_lib.build_unet(config.unet)
  schedule = schedules.schedule_from_config(config.diffusion)
  ddim = _ddim_options(config, num_steps, strength)
  scale_factor = run.scale_factor
  unknown = sorted(set(outputs) - {"noise", *OUTPUTS})
  if unknown:
    raise ValueError(f"unknown outputs {unknown}; choose from noise, {', '.join(OUTPUTS)}")

  def one(params, image, cond_from, cond_to):
    ae = {"params": params["autoencoder"]}
    mean, _ = autoencoder.apply(ae, image[..., None], method="encode")
    z0 = mean * scale_factor
    decode = lambda z: networks.as_image(
        autoencoder.apply(ae, z / scale_factor, method="decode")[..., 0])

    def denoiser(cond):
      def with_cond(x, t, c):
        x_in, context = unet_lib.hybrid_conditioning(x, c)
        return unet.apply({"params": params["unet"]}, x_in, jnp.full((x.shape[0],), t),
                          context=context)
      return guidance.guided(with_cond, cond, guidance_scale)

    out = {}
    # The UNet's parameters are the same at every step: its prepared kernels are made once.
    with ops.invariant_kernels():
      if {"noise", "reconstruction", "edited"} & set(outputs):
        noise = inversion.ddim_invert(denoiser(cond_from), z0, schedule, **ddim)
        if "noise" in outputs:
          out["noise"] = noise
        for name, cond in (("reconstruction", cond_from), ("edited", cond_to)):
          if name in outputs:
            out[name] = decode(inversion.ddim_regenerate(denoiser(cond), noise, schedule, **ddim))
    if "autoencoder" in outputs:
      out["autoencoder"] = decode(z0)
    return out

  def per_sample(params, images, cond_from, cond_to):
    return jax.lax.map(
        lambda a: jax.tree.map(lambda y: y[0], one(params, a[0][None], a[1][None], a[2][None])),
        (images, cond_from, cond_to))

  return per_sample


def check_images(images, shape: Sequence[int]) -> np.ndarray:
  """(B, X, Y, Z) float32 on the run's grid, finite; DataError saying what is wrong."""
  images = np.asarray(images, np.float32)
  shape = tuple(int(n) for n in shape)
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[1:] != shape:
    raise DataError(f"images have shape {images.shape}, not (batch, {', '.join(map(str, shape))}) "
                    "of the run's grid; load them with nifti.load_volume(path, data.shape, "
                    "data.spacing, data.clip_percentiles)")
  if not np.all(np.isfinite(images)):
    raise DataError("images contain NaN or infinite values")
  return images


def _normalised(run: api.Run, cond, batch: int, what: str) -> jnp.ndarray:
  names = tuple(run.config.data.covariates)
  matrix = api.covariate_matrix(cond, names)
  if matrix.shape[0] != batch:
    raise DataError(f"{what} has {matrix.shape[0]} rows for {batch} images")
  return jnp.asarray(api.normalise_covariates(matrix, run.stats, names))


def make_inverter(run: api.Run, *, num_steps: int | None = None,
                  guidance_scale: float | None = None, strength: float = 1.0) -> Callable:
  """`invert(params, images, cond) -> (B, *latent_shape)`: the latents DDIM regenerates them from.

  Deterministic (DDIM with eta = 0: no keys). Defaults: the run's `config.sampling`; the state is
  at timestep `inversion.edit_timesteps(...)[0]` (the sampler's first timestep at strength 1).
  """
  options = edit_options(run, num_steps=num_steps, guidance_scale=guidance_scale,
                         strength=strength)
  fn = jax.jit(counterfactual_fn(run, outputs=("noise",), **options))
  shape = run.config.data.shape

  def invert(params, images, cond):
    images = check_images(images, shape)
    c = _normalised(run, cond, len(images), "cond")
    return fn(params, jnp.asarray(images), c, c)["noise"]

  return invert


def make_editor(run: api.Run, *, num_steps: int | None = None,
                guidance_scale: float | None = None, strength: float = 1.0) -> Callable:
  """`edit(params, images, cond_from, cond_to) -> (B, X, Y, Z)` in [0, 1]: the subjects with new
  covariates. Deterministic (no keys); `strength` < 1 inverts only that fraction of the steps."""
  options = edit_options(run, num_steps=num_steps, guidance_scale=guidance_scale,
                         strength=strength)
  fn = jax.jit(counterfactual_fn(run, outputs=("edited",), **options))
  shape = run.config.data.shape

  def edit(params, images, cond_from, cond_to):
    images = check_images(images, shape)
    return fn(params, jnp.asarray(images), _normalised(run, cond_from, len(images), "cond_from"),
              _normalised(run, cond_to, len(images), "cond_to"))["edited"]

  return edit


# ----------------------------------------------------------------------------------------------
# Requested changes


@dataclasses.dataclass(frozen=True)
class Change:
  """One covariate change: `+v` / `-v` (add), `*v` (scale) or `v` (set), in natural units."""
  name: str
  op: str  # "+", "*" or "="
  value: float

  def apply(self, current: float) -> float:
    if self.op == "+":
      return current + self.value
    if self.op == "*":
      return current * self.value
    return self.value

  def __str__(self) -> str:
    if self.op == "+":
      return f"{self.name}={self.value:+g}"
    return f"{self.name}={'*' if self.op == '*' else ''}{self.value:g}"


def _unknown(name: str, names: Sequence[str], where: str) -> DataError:
  return DataError(f"{where}: unknown covariate {name!r}; the run's covariates are "
                   f"{', '.join(names)}")


def parse_changes(text: str, names: Sequence[str]) -> list[Change]:
  """'age=+10, ventricular_volume=*1.5, sex=F' -> Changes; DataError naming a bad entry."""
  where = "counterfactual.change"
  changes = []
  for entry in (e.strip() for e in text.split(",")):
    if not entry:
      continue
    name, sep, rhs = (part.strip() for part in entry.partition("="))
    if not sep or not rhs:
      raise ConfigError(f"{where}={text!r}: {entry!r} is not NAME=VALUE (e.g. age=+10, "
                        "ventricular_volume=*1.5, brain_volume=1200)")
    if name not in names:
      raise _unknown(name, names, where)
    op = rhs[0] if rhs[0] in "+-*" else "="
    number = rhs[1:] if op == "*" else rhs
    if name == "sex" and number.lower() in manifest.SEX_CODES and op == "=":
      changes.append(Change(name, "=", manifest.SEX_CODES[number.lower()]))
      continue
    value = manifest.parse_finite(number, lambda is_number: ConfigError(
        f"{where}: {entry!r} is not finite" if is_number
        else f"{where}: {entry!r}: {number!r} is not a number"))
    changes.append(Change(name, "+" if op in "+-" else op, value))
  if not changes:
    raise ConfigError(f"{where} is empty: say what to change, e.g. "
                      "--config.counterfactual.change='age=+10', or give "
                      "counterfactual.targets_tsv")
  if len({c.name for c in changes}) != len(changes):
    raise ConfigError(f"{where}={text!r} changes a covariate twice")
  return changes


def read_targets_tsv(path: str, names: Sequence[str]) -> dict[str, dict[str, float]]:
  """participant_id -> {covariate: target} from a TSV; empty or n/a cells keep the subject's own."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: targets table not found (counterfactual.targets_tsv)")
  with open(path, encoding="utf-8-sig", newline="") as f:
    reader = csv.reader(f, delimiter="\t")
    header = [c.strip() for c in next(reader, [])]
    rows = [row for row in reader if any(c.strip() for c in row)]
  if "participant_id" not in header:
    raise DataError(f"{path}: needs a participant_id column (columns: {', '.join(header)})")
  columns = [c for c in header if c != "participant_id"]
  for c in columns:
    if c not in names:
      raise _unknown(c, names, path)
  if not columns or not rows:
    raise DataError(f"{path}: needs participant_id, at least one covariate column and one row")
  targets = {}
  for line, row in enumerate(rows, start=2):
    if len(row) != len(header):
      raise DataError(f"{path}: row {line} has {len(row)} cells but the header has {len(header)}")
    cells = dict(zip(header, (c.strip() for c in row)))
    sid = cells["participant_id"]
    sid = sid if sid.startswith("sub-") else f"sub-{sid}"
    if sid in targets:
      raise DataError(f"{path}: participant_id {sid} appears twice")
    try:
      targets[sid] = {c: manifest.parse_covariate(c, cells[c], sid) for c in columns
                      if cells[c].lower() not in manifest.MISSING}
    except DataError as e:
      raise DataError(f"{path}: {e}") from None
  return targets


def plan_targets(subjects: Sequence[manifest.Subject], names: Sequence[str],
                 stats: manifest.CovariateStats, changes: Sequence[Change] | None = None,
                 targets: Mapping[str, Mapping[str, float]] | None = None
                 ) -> tuple[list[manifest.Subject], np.ndarray, np.ndarray]:
  """(subjects, cond_from, cond_to) in natural units; targets outside the training range refused.

  With `targets` only the subjects it lists are kept (all of them must be in the cohort).
  """
  if targets is not None:
    ids = {s.participant_id for s in subjects}
    missing = sorted(set(targets) - ids)
    if missing:
      raise DataError(f"counterfactual.targets_tsv lists subjects not in the cohort: "
                      f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    subjects = [s for s in subjects if s.participant_id in targets]
  cond_from = np.array([[s.covariates[n] for n in names] for s in subjects], np.float64)
  cond_to = cond_from.copy()
  for i, s in enumerate(subjects):
    for j, name in enumerate(names):
      if targets is not None:
        cond_to[i, j] = targets[s.participant_id].get(name, cond_from[i, j])
      else:
        for c in changes or ():
          if c.name == name:
            cond_to[i, j] = c.apply(cond_from[i, j])
  lo, hi = np.asarray(stats.minimum), np.asarray(stats.maximum)
  for i, s in enumerate(subjects):
    for j, name in enumerate(names):
      changed = cond_to[i, j] != cond_from[i, j]
      if changed and not lo[j] <= cond_to[i, j] <= hi[j]:
        raise DataError(f"{s.participant_id}: target {name}={cond_to[i, j]:g} is outside the "
                        f"run's training range [{lo[j]:g}, {hi[j]:g}]; the model has not seen "
                        "such brains (choose a smaller change)")
  return list(subjects), cond_from, cond_to


# ----------------------------------------------------------------------------------------------
# Measurements


def region_changes(difference: np.ndarray, atlas: volumes_lib.Atlas) -> dict[str, float]:
  """Mean |difference| in the ventricle region and in the rest of the brain (template priors)."""
  vent = atlas.ventricle_region > 0
  rest = (atlas.brain_region > 0) & ~vent
  a = np.abs(np.asarray(difference, np.float64))
  return {"ventricle_region": float(a[vent].mean()), "rest_of_brain": float(a[rest].mean())}


def line_fit(requested, measured) -> dict:
  """Pearson r, least-squares slope and intercept of measured vs requested; None when undefined
  (e.g. every subject requested the same change)."""
  x, y = np.asarray(requested, np.float64), np.asarray(measured, np.float64)
  r = charts.pearson_r(x, y)
  slope = intercept = None
  if x.size >= 2 and np.std(x) > 0:
    slope, intercept = (float(v) for v in np.polyfit(x, y, 1))
  return dict(r=r if math.isfinite(r) else None, slope=slope, intercept=intercept, n=int(x.size))


__all__ = ["Change", "counterfactual_fn", "edit_options", "make_editor", "make_inverter",
           "parse_changes", "plan_targets", "read_targets_tsv"]
