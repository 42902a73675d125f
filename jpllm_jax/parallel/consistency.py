"""Replica consistency: copies of an array that its sharding says are equal must still be equal.

The seed's Fugaku port diverged "only when we used Tensor Parallelism" because random seeds went out of sync on
some ranks; nothing noticed until the loss did. `check_replicas` finds such a desync on the step it happens: every
device checksums its own buffer of each leaf (one shard_map), the checksums are gathered, and only the leaves
whose copies disagree are compared exactly (an all_gather along the disagreeing axis) for the size of the
difference.
"""
from __future__ import annotations

import collections
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec


class Mismatch(NamedTuple):
  """Devices along `axis` whose copy of the leaf at `path` differs from the majority copy of their line."""
  path: str
  axis: str
  device_ids: tuple[int, ...]
  max_abs_diff: float


class ReplicaDesync(RuntimeError):
  """Raised by `assert_replicas_equal`; the message names each tensor, mesh axis and device."""


def _spec_axes(spec: PartitionSpec) -> set[str]:
  used = set()
  for entry in spec:
    if entry is not None:
      used.update(entry if isinstance(entry, tuple) else (entry,))
  return used


def replicated_axes(x: jax.Array) -> list[str]:
  """The mesh axes (of size > 1) over which the sharding of `x` holds copies."""
  sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return []
  used = _spec_axes(sharding.spec)
  return [a for a in sharding.mesh.axis_names if a not in used and sharding.mesh.shape[a] > 1]


def _bits(x: jax.Array) -> jax.Array:
  """The raw bits of `x` as uint32 (64-bit values as two words), so that -0.0, NaN payloads and all count."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def checksum(block: jax.Array) -> jax.Array:
  """Two uint32 words: the sum of the bits and a position-weighted sum (wrapping), so a swap also shows."""
  bits = _bits(block).reshape(-1)
  weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


@functools.lru_cache(maxsize=256)
def _program(mesh, spec: PartitionSpec, axis: str | None):
  """The jitted per-device checksum (`axis` None) or diff-along-`axis` program, built once per layout."""
  ones = (1,) * len(mesh.axis_names)
  if axis is None:
    body = lambda b: checksum(b).reshape(ones + (2,))
  else:
    body = lambda b: _diffs(b, axis).reshape(ones + (mesh.shape[axis],))
  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,), out_specs=PartitionSpec(*mesh.axis_names),
                               check_vma=False))


def _per_device(x: jax.Array, axis: str | None = None) -> np.ndarray:
  """Each device's checksum of its own block (`axis` None: mesh.shape + (2,)) or its max abs diff to every
  member of its line along `axis` (mesh.shape + (n,)), as a host array."""
  out = _program(x.sharding.mesh, x.sharding.spec, axis)(x)
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(out, tiled=True))
  return np.asarray(out)


def _diffs(block: jax.Array, axis: str) -> jax.Array:
  """max |own block - copy of member j| for every member j of this device's line along `axis`."""
  copies = jax.lax.all_gather(block, axis)
  if jax.dtypes.issubdtype(block.dtype, jax.dtypes.prng_key):
    copies, block = jax.random.key_data(copies), jax.random.key_data(block)
  delta = jnp.abs(copies.astype(jnp.float32) - block.astype(jnp.float32)[None])
  return jnp.max(delta.reshape(delta.shape[0], -1), axis=1)


def _lines(mesh_shape: tuple[int, ...], axis: int):
  """Index tuples of every line of the device grid along `axis` (all coordinates but `axis` fixed)."""
  others = [range(n) if i != axis else [slice(None)] for i, n in enumerate(mesh_shape)]
  for idx in np.ndindex(*[len(r) for r in others]):
    yield tuple(others[i][j] for i, j in enumerate(idx))


def _leaf_mismatches(path: str, x: jax.Array) -> list[Mismatch]:
  axes = replicated_axes(x)
  if not axes or x.size == 0:
    return []
  mesh = x.sharding.mesh
  sums = _per_device(x)
  out = []
  for axis in axes:
    a = mesh.axis_names.index(axis)
    diffs = None
    for line in _lines(sums.shape[:-1], a):
      words = [tuple(w) for w in sums[line]]  # (n, 2): one checksum per member of the line.
      if len(set(words)) == 1:
        continue
      counts = collections.Counter(words)
      top = max(counts.values())
      ref = next(i for i, w in enumerate(words) if counts[w] == top)  # the majority; a tie: the first member.
      bad = [i for i, w in enumerate(words) if w != words[ref]]
      if diffs is None:
        diffs = _per_device(x, axis)
      devices = mesh.devices[line]
      out.append(Mismatch(path, axis, tuple(int(devices[i].id) for i in bad),
                          float(max(diffs[line][i][ref] for i in bad))))
  return out


def check_replicas(tree: Any) -> list[Mismatch]:
  """Every (leaf path, mesh axis, device ids, max abs difference) where copies that the leaf's sharding
  replicates over that axis differ; [] when all agree. Leaves that are not NamedSharding-ed arrays are skipped."""
  mismatches = []
  for key, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, jax.Array):
      mismatches += _leaf_mismatches(jax.tree_util.keystr(key), leaf)
  return mismatches


def assert_replicas_equal(tree: Any, what: str = "") -> None:
  """Raises `ReplicaDesync` naming every tensor, axis and device whose copies disagree."""
  found = check_replicas(tree)
  if found:
    lines = [f"{m.path} differs across mesh axis '{m.axis}' on device(s) {list(m.device_ids)} "
             f"(max abs diff {m.max_abs_diff:.3g})" for m in found]
    raise ReplicaDesync(f"replicas out of sync{' ' + what if what else ''}:\n  " + "\n  ".join(lines))
