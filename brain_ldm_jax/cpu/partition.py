"""Custom calls in batch-sharded programs: each device calls the handler on its own examples.

XLA cannot see into a custom call and would otherwise gather every operand onto every device and
run the whole batch everywhere. `per_example` gives a custom call a custom partitioning rule.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P


def per_example(fn, n_static: int, batched_args: tuple[bool, ...],
                batched_results: bool | tuple[bool, ...]):
  """`fn(*static, *arrays)` partitioned over the batch (leading) dimension of the arrays marked
  in `batched_args` / `batched_results` (a bool when fn returns one array, a tuple when it
  returns a tuple); the other arrays are whole on every device.

  A result without the batch dimension computed from batched arguments is a sum over the
  examples (the kernel and bias gradients): each device sums its own, then one all-reduce. On a
  single device this is `fn` itself.
  """
  single = isinstance(batched_results, bool)
  batched_results = (batched_results,) if single else batched_results
  wrapped = custom_partitioning(fn, static_argnums=tuple(range(n_static)))

  def batch_axes(arg_shapes, result_shapes):
    """The mesh axes the batch is split over: an operand's, else the one proposed for a result
    (an operand may be a replicated constant)."""
    for batched, array in zip(batched_args + batched_results, (*arg_shapes, *result_shapes)):
      spec = tuple(array.sharding.spec) if batched and array.sharding is not None else ()
      if spec and spec[0] is not None:
        return spec[0]
    return None

  def shardings(mesh, arg_shapes, result_shapes):
    axes = batch_axes(arg_shapes, result_shapes)

    def sharding(batched, ndim):
      return NamedSharding(mesh, P(axes if batched else None, *(None,) * (ndim - 1)))

    args = tuple(sharding(b, len(a.shape)) for b, a in zip(batched_args, arg_shapes))
    results = tuple(sharding(b, len(r.shape)) for b, r in zip(batched_results, result_shapes))
    return axes, args, results[0] if single else results

  def partition(*static_and_shapes):
    *static, mesh, arg_shapes, result_shape = static_and_shapes
    result_shapes = (result_shape,) if single else result_shape
    axes, args, results = shardings(mesh, arg_shapes, result_shapes)

    def lower_fn(*arrays):
      out = fn(*static, *arrays)
      if axes is None:
        return out
      outs = (out,) if single else out
      outs = tuple(o if b else jax.lax.psum(o, axes) for o, b in zip(outs, batched_results))
      return outs[0] if single else outs

    return mesh, lower_fn, results, args

  def infer_sharding_from_operands(*static_and_shapes):
    *_, mesh, arg_shapes, result_shape = static_and_shapes
    result_shapes = (result_shape,) if single else result_shape
    return shardings(mesh, arg_shapes, result_shapes)[2]

  def sharding_rule(*static_and_types):
    *_, _, value_types, result_types = static_and_types
    names = iter(f"f{i}" for i in range(1000))

    def dims(batched, ty):
      rest = [next(names) for _ in range(len(ty.shape) - int(batched))]
      return " ".join((["b"] if batched else []) + rest)

    operands = ", ".join(dims(b, t) for b, t in zip(batched_args, value_types))
    results = ", ".join(dims(b, t) for b, t in zip(batched_results, result_types))
    summed = any(batched_args) and not all(batched_results)
    return f"{operands} -> {results}", {"reduction_factors": ("b",)} if summed else {}

  wrapped.def_partition(partition, infer_sharding_from_operands=infer_sharding_from_operands,
                        sharding_rule=sharding_rule)

  def call(*args):
    static, arrays = args[:n_static], args[n_static:]

    # custom_partitioning has no batching rule: under vmap, fn's own ffi_call batches.
    @jax.custom_batching.custom_vmap
    def op(*arrays):
      return wrapped(*static, *arrays)

    @op.def_vmap
    def op_vmap(axis_size, in_batched, *arrays):
      del axis_size
      in_axes = tuple(0 if batched else None for batched in in_batched)
      out = jax.vmap(functools.partial(fn, *static), in_axes=in_axes)(*arrays)
      return out, jax.tree.map(lambda _: True, out)

    return op(*arrays)

  return call
