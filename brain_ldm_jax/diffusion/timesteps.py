"""Which timesteps a sampler visits, and where each step goes.

`ddim_timesteps` lists the timesteps of an N-step chain under each spacing rule;
`ddim_transitions` adds each step's destination, which differs from the next listed timestep
only under MONAI 1.6's DDIM rule. `samplers` and `inversion` both walk these lists.
"""

from __future__ import annotations

import numpy as np

from brain_ldm_jax.errors import ConfigError
from brain_ldm_jax.diffusion.schedules import torch_linspace

# "monai" is not a spacing of its own but MONAI 1.6's DDIM rule (see `ddim_transitions`): the
# "linspace" listing, stepped t -> t - T // N. Only the DDIM sampler has it.
MONAI_DDIM_RULE = "monai"
TIMESTEP_SPACINGS = ("leading", "linspace", "quadratic", MONAI_DDIM_RULE)


def ddim_timesteps(
    num_train_timesteps: int,
    num_inference_steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> np.ndarray:
  """The descending int32 timesteps at which a sampler evaluates the network.

  Spacings (T train timesteps, N inference steps):
    * "leading": `arange(N)[::-1] * (T // N) + steps_offset` — MONAI GenerativeModels 0.2, which
      trained and sampled the paper's model (DDIM-50: 980, 960, …, 0). MONAI's `step()` takes the
      previous timestep as t − T // N, which is exactly the next listed one here.
    * "linspace": `round(linspace(T − 1 − offset, 0, N)) + offset` — MONAI 1.6's
      `DDIMScheduler.set_timesteps` default and `DDPMScheduler.set_timesteps` (999, 979, 958, …
      for N = 50), with torch's float32 linspace rounding.
    * "quadratic": `round((sqrt(T − 1 − offset) · (1 − j/(N − 1)))²) + offset` — dense near
      t = 0, where λ = log(α/σ) changes fastest (DPM-Solver's "time_quadratic"); nudged apart
      where rounding would repeat a timestep. The default of `dpmpp_2m_sample`: on a Gaussian toy
      problem its 20-step error is >10× smaller than with uniform timesteps, whose last step
      spans a λ interval of ~2.
    * "monai": the "linspace" listing; as a DDIM rule it also changes where each step goes (see
      `ddim_transitions`).

  Note for users comparing with MONAI 1.6's default DDIM (linspace listing): MONAI's `step()`
  still jumps t → t − T // N, not to the next listed timestep, so it evaluates the network at
  999, 979, 958, … but moves the state to 979, 959, 938, …. Our samplers always step to the next
  listed timestep, so on "linspace" they differ from MONAI 1.6's default unless N divides T and
  the rounding lines up. On "leading" (the paper's, where MONAI is self-consistent) they agree.
  The DDIM sampler's "monai" rule does what MONAI 1.6 does, for users who need its output.

  Args:
    num_train_timesteps: T.
    num_inference_steps: N, 1 ≤ N ≤ T.
    spacing: one of `TIMESTEP_SPACINGS`.
    steps_offset: added to every timestep, as MONAI's `steps_offset`.

  Returns:
    (N,) int32 numpy array, strictly decreasing.
  """
  t, n = num_train_timesteps, num_inference_steps
  if not 1 <= n <= t:
    raise ConfigError(f"sampling.num_steps must be in [1, {t}] (diffusion.num_train_timesteps), "
                     f"got {n}.")
  if not 0 <= steps_offset < t:
    raise ValueError(f"steps_offset must be in [0, {t}), got {steps_offset}.")
  if spacing == "leading":
    ts = np.arange(n)[::-1] * (t // n) + steps_offset
  elif spacing in ("linspace", MONAI_DDIM_RULE):
    ts = np.round(torch_linspace(t - 1 - steps_offset, 0, n)).astype(np.int64) + steps_offset
  elif spacing == "quadratic":
    top = t - 1 - steps_offset
    frac = 1.0 - np.arange(n) / max(n - 1, 1)
    ts = np.round((np.sqrt(top) * frac) ** 2).astype(np.int64)
    # Rounding can repeat the smallest timesteps when N is large; keep one apart from the next.
    for j in range(n - 2, -1, -1):
      ts[j] = max(ts[j], ts[j + 1] + 1)
    ts = ts + steps_offset
  else:
    raise ConfigError(f"sampling.timestep_spacing must be one of {TIMESTEP_SPACINGS}, got "
                     f"{spacing!r}.")
  if ts[0] > t - 1 or ts[-1] < 0 or np.any(np.diff(ts) >= 0):
    raise ValueError(f"{n} steps with spacing {spacing!r} and steps_offset {steps_offset} give "
                     f"timesteps outside [0, {t}) or repeated ones: {ts.tolist()[:8]}…; use fewer "
                     "steps or a smaller offset.")
  return ts.astype(np.int32)


def ddim_transitions(
    num_train_timesteps: int,
    num_inference_steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """(timesteps, previous): DDIM step j evaluates the network at timesteps[j] and moves to previous[j].

  For every spacing but "monai", previous[j] is the next listed timestep (−1 after the last: the
  end point, ᾱ = `final`). "monai" is MONAI 1.6's `DDIMScheduler` as it is: `set_timesteps` lists
  the "linspace" timesteps (999, 979, 958, … for N = 50) while `step()` moves the state from t to
  t − T // N (999 → 979, 979 → 959, 958 → 938, …), so the state and the timestep the network is
  told disagree by up to a step; a previous timestep below 0 takes MONAI's final ᾱ (1, or ᾱ_0
  with `set_alpha_to_one=False`). Not the default: it is offered to reproduce MONAI's output
  (e.g. the published bundle's sampler) from the same weights and noise.

  Returns:
    two (N,) int32 arrays; a negative previous timestep means the end point.
  """
  ts = ddim_timesteps(num_train_timesteps, num_inference_steps, spacing, steps_offset)
  if spacing == MONAI_DDIM_RULE:
    previous = ts - num_train_timesteps // num_inference_steps
  else:
    previous = np.append(ts[1:], -1)
  return ts, previous.astype(np.int32)


def no_monai_rule(spacing: str, sampler: str) -> None:
  if spacing == MONAI_DDIM_RULE:
    raise ConfigError(f"sampling.timestep_spacing={spacing!r} is MONAI 1.6's DDIM stepping rule; "
                      f"the {sampler} sampler does not have it (use 'linspace' for MONAI's "
                      "listing, or sampler 'ddim')")
