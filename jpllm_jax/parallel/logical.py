"""Logical axis names (MaxText style) and the rules table that maps them to mesh axes.

Model code names the axes of every weight and activation (`batch`, `length`, `embed`, `heads`,
`kv_heads`, `head_dim`, `mlp`, `vocab`, `layers`, and `expert` for the E dimension of expert weights) and
calls `logical_constraint`. Outside an `axis_rules(...)` context that call is the identity, so the models
run unchanged on one device; inside it, the activation is constrained to the sharding the rules give.
Changing the parallel layout means changing the rules, never the model.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# `None` in an axes tuple marks a dimension that is never sharded; the rules table (parallel.mesh.DEFAULT_RULES)
# names every logical axis that can be.
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

_STATE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "jpllm_axis_rules", default=None)


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Within this context, `logical_constraint` shards activations on `mesh` by `rules`, and the model runs the
  parallel strategy for them (`jpllm_jax.parallel.expert.strategy`: expert parallelism over an `expert` axis)."""
  # Imported here: expert.py builds on this module, and the models import this module but never expert.py.
  from jpllm_jax.models import strategy  # pylint: disable=import-outside-toplevel
  from jpllm_jax.parallel import expert  # pylint: disable=import-outside-toplevel
  token = _STATE.set((mesh, tuple(rules)))
  try:
    with strategy.use(expert.strategy(mesh, tuple(rules))):
      yield
  finally:
    _STATE.reset(token)


def current_rules() -> tuple[Mesh, Rules] | None:
  return _STATE.get()


def logical_to_spec(axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
  """Maps logical axis names to a `PartitionSpec`; a mesh axis is used at most once per array."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in axes:
    mesh_axes = table.get(name) if name is not None else None
    if mesh_axes is None:
      spec.append(None)
      continue
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    free = tuple(a for a in mesh_axes if a not in used)
    used.update(free)
    spec.append(free[0] if len(free) == 1 else (free or None))
  return PartitionSpec(*spec)


def logical_constraint(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Constrains `x` to the sharding of its logical `axes` under the active rules (identity without)."""
  state = _STATE.get()
  if state is None:
    return x
  if len(axes) != x.ndim:
    raise ValueError(f"logical axes {tuple(axes)} do not match an array of rank {x.ndim}")
  mesh, rules = state
  spec = logical_to_spec(axes, rules)
  inner = jax.sharding.get_abstract_mesh()
  if not inner.empty and inner.manual_axes:  # inside a shard_map (the pipeline's stages): its mesh, auto axes only
    manual = set(inner.manual_axes)
    keep = lambda e: e if e is None or isinstance(e, str) and e not in manual else (  # noqa: E731
        tuple(a for a in e if a not in manual) or None if not isinstance(e, str) else None)
    return jax.lax.with_sharding_constraint(x, NamedSharding(inner, PartitionSpec(*map(keep, spec))))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
