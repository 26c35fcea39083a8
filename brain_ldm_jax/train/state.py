"""Train states laid out on the mesh: eval_shape -> shardings -> jitted init (as big_vision does).

Large parameters and their optimizer moments are split over the mesh's `fsdp` axis by
`sharding.param_shardings`; optimizer moments have their parameter's shape, so they get the same
layout. RNG keys are stored as raw uint32 key data, which every checkpoint format understands.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from brain_ldm_jax import sharding as sharding_lib
from brain_ldm_jax.nn.convert import ONCE_COMPILER_OPTIONS


def init_sharded(init_fn: Callable[[], Any], mesh, min_size: int) -> tuple[Any, Any, Any]:
  """(init, shardings, abstract state): `init()` builds the state directly in its layout."""
  abstract = jax.eval_shape(init_fn)
  shardings = sharding_lib.param_shardings(abstract, mesh, min_size)
  jitted = jax.jit(init_fn, out_shardings=shardings)

  def init():
    return jitted.lower().compile(compiler_options=ONCE_COMPILER_OPTIONS)()

  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return init, shardings, abstract


def step_key(key_data: jax.Array, step: jax.Array) -> jax.Array:
  """The RNG key of one training step: fold_in(run key, step), so resuming draws the same."""
  return jax.random.fold_in(jax.random.wrap_key_data(key_data), step)


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(section) -> float | optax.Schedule:
  """A training section's learning rate: constant, or cosine-decayed to 0 over the last
  `lr_decay_fraction` of its num_steps (constant before; 1.0 decays over the whole run).

  The demo's autoencoder decays over its last quarter, which settles what a constant rate leaves
  wandering; the LDMs keep a constant rate, as decaying the demo LDM's did not make its samples
  follow their covariates better (docs/summary.md).
  """
  if section.lr_schedule != "cosine":
    return section.learning_rate
  decay_steps = max(1, round(section.get("lr_decay_fraction", 1.0) * section.num_steps))
  cosine = optax.cosine_decay_schedule(section.learning_rate, decay_steps)
  constant_steps = section.num_steps - decay_steps
  if constant_steps <= 0:
    return cosine
  return optax.join_schedules([optax.constant_schedule(section.learning_rate), cosine],
                              [constant_steps])


def adam(learning_rate: float | optax.Schedule,
         weight_decay: float = 0.0) -> optax.GradientTransformation:
  if weight_decay:
    return optax.adamw(learning_rate, weight_decay=weight_decay)
  return optax.adam(learning_rate)


def ema_update(ema, params, decay: float):
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
