"""Varying mesh axes (shard_map's type system) for kernels and custom VJPs that build values themselves.

Inside `jax.shard_map`, every value's type records the mesh axes it varies over. A `lax.cond` needs both
branches to agree, a `scan` carry must keep its type, a custom VJP's cotangents must match its inputs, and a
`pallas_call` must declare its output's axes. Zeros built from a shape vary over no axis, so code that runs both
inside and outside shard_map casts them, and its inputs, to the union of the axes of the values they meet.
Outside shard_map every value varies over no axis and these functions return their inputs unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def varying_axes(*xs) -> frozenset:
  """The mesh axes that any of `xs` varies over."""
  return frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in xs))


def _vary_over(x, axes: frozenset):
  missing = tuple(sorted(axes - varying_axes(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def vary_alike(*xs) -> tuple:
  """`xs`, each cast to vary over every mesh axis that any of them varies over (the transposes of these casts
  are the psums over the axes that replicated each input)."""
  axes = varying_axes(*xs)
  return tuple(_vary_over(x, axes) for x in xs)


def zeros(shape, dtype, *like) -> jax.Array:
  """Zeros of `shape` and `dtype` that vary over the mesh axes of `like`."""
  return _vary_over(jnp.zeros(shape, dtype), varying_axes(*like))


def shape_dtype(shape, dtype, like) -> jax.ShapeDtypeStruct:
  """A `pallas_call` out_shape that varies over the mesh axes of `like`."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)
