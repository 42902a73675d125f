"""Batched GEMMs for irregular shapes on XLA:CPU (issue 19; Fugaku-LLM's "6x by optimizing batched operations
for irregular sizes").

A training step issues many small, oddly-shaped GEMMs: per-head attention products (head_dim 144 in Fugaku-LLM
13B), the shards of tensor-parallel splits, MoE expert groups of ragged sizes. Issued one by one, each pays a
dispatch and runs at a small GEMM's efficiency. Here they are grouped into buckets; each bucket is one batched
`dot_general` over its members zero-padded to a common (M, K, N), with K and N rounded up to a whole number of
fp32 vectors of the platform profile (16 lanes for SVE-512 / AVX-512, 8 for AVX2, cpu.profile()). The zero
padding leaves the products exact. Bucketing bounds the padding waste (padded minus useful FLOPs, over padded
FLOPs) per bucket, and the plan reports it. Each bucket's batched product runs on XLA's dot_general, or, where the
profile asks for the SVE kernel (A64FX) and it is built, on jpllm_jax/kernels_sve (fp32).

  plan = batched_gemm.plan([(m, k, n), ...])           # buckets, waste
  outs = batched_gemm.matmuls(lhs_list, rhs_list)      # == [a @ b for a, b in zip(lhs_list, rhs_list)]
  out = batched_gemm.grouped_matmul(x, w, group_sizes) # MoE: rows of x sorted by expert, w [E, K, N]
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jpllm_jax import cpu

# Default bound on a bucket's padding waste (the goal: <= 15% overall).
MAX_WASTE = 0.15


def _round_up(a: int, b: int) -> int:
  return -(-a // b) * b


def _flops(m: int, k: int, n: int) -> int:
  return 2 * m * k * n


@dataclasses.dataclass(frozen=True)
class Bucket:
  members: tuple[int, ...]       # indices into Plan.shapes
  shape: tuple[int, int, int]    # the padded (M, K, N) every member runs at


@dataclasses.dataclass(frozen=True)
class Plan:
  shapes: tuple[tuple[int, int, int], ...]   # each GEMM's (m, k, n)
  buckets: tuple[Bucket, ...]
  multiple: int                              # K and N are padded to a multiple of this

  @property
  def useful_flops(self) -> int:
    return sum(_flops(*s) for s in self.shapes)

  @property
  def padded_flops(self) -> int:
    return sum(len(b.members) * _flops(*b.shape) for b in self.buckets)

  @property
  def waste(self) -> float:
    """Fraction of the FLOPs run that multiply padding."""
    return 1.0 - self.useful_flops / max(1, self.padded_flops)

  def report(self) -> dict:
    return dict(gemms=len(self.shapes), buckets=len(self.buckets), multiple=self.multiple,
                useful_gflop=self.useful_flops / 1e9, padded_gflop=self.padded_flops / 1e9,
                padding_waste=round(self.waste, 4))


def _bucket_waste(shapes, members, shape) -> float:
  useful = sum(_flops(*shapes[i]) for i in members)
  return 1.0 - useful / max(1, len(members) * _flops(*shape))


def plan(shapes: Sequence[tuple[int, int, int]], multiple: int | None = None,
         max_waste: float = MAX_WASTE) -> Plan:
  """Buckets for GEMMs of (m, k, n). Greedy, largest first: a GEMM joins the bucket whose padded FLOPs grow
  least while the bucket's padding beyond its members' own rounded shapes stays within `max_waste` of its
  FLOPs, else opens a bucket of its own. A bucket's shape is its members' largest m and largest k and n, with k
  and n rounded up to `multiple` (default: the profile's fp32 lanes). The rounding itself is not bounded (tiny
  shapes may waste more): Plan.waste reports everything."""
  multiple = multiple or cpu.profile().pad_multiple
  shapes = tuple(tuple(int(d) for d in s) for s in shapes)
  padded = [(m, _round_up(k, multiple), _round_up(n, multiple)) for m, k, n in shapes]
  order = sorted(range(len(shapes)), key=lambda i: (_flops(*padded[i]), padded[i]), reverse=True)
  groups: list[tuple[list[int], tuple[int, int, int]]] = []
  for i in order:
    best, best_cost = None, None
    for g, (members, shape) in enumerate(groups):
      grown = tuple(max(a, b) for a, b in zip(shape, padded[i]))
      if _bucket_waste(padded, members + [i], grown) > max_waste:
        continue
      cost = (len(members) + 1) * _flops(*grown) - len(members) * _flops(*shape)
      if best_cost is None or cost < best_cost:
        best, best_cost = g, cost
    if best is None:
      groups.append(([i], padded[i]))
    else:
      members, shape = groups[best]
      groups[best] = (members + [i], tuple(max(a, b) for a, b in zip(shape, padded[i])))
  buckets = tuple(Bucket(tuple(sorted(m)), s) for m, s in groups)
  return Plan(shapes, buckets, multiple)


def _stack_padded(xs: Sequence[jax.Array], rows: int, cols: int) -> jax.Array:
  """[len(xs), rows, cols]: each x written into a zero buffer (in-place dynamic-update-slices; XLA:CPU runs a
  concatenate of many padded operands about 2x slower)."""
  out = jnp.zeros((len(xs), rows, cols), jnp.result_type(*xs))
  for j, x in enumerate(xs):
    out = jax.lax.dynamic_update_slice(out, x[None].astype(out.dtype), (j, 0, 0))
  return out


BACKENDS = ("xla", "sve")


def gemm_backend(dtype=jnp.float32) -> str:
  """The bucket kernel used by default for operands of `dtype`: "sve" where the profile asks for it
  (cpu.Profile.gemm_kernel), the kernel is available (kernels_sve.available()) and the dtype is fp32, else "xla"."""
  if cpu.profile().gemm_kernel == "sve" and jnp.dtype(dtype) == jnp.float32:
    from jpllm_jax import kernels_sve  # pylint: disable=import-outside-toplevel
    if kernels_sve.available():
      return "sve"
  return "xla"


def _bdot(a: jax.Array, b: jax.Array, precision, backend: str | None = None) -> jax.Array:
  """[G, M, K] x [G, K, N] -> [G, M, N] as one batched product: XLA's dot_general, or the SVE kernel."""
  dtype = jnp.result_type(a.dtype, b.dtype)
  backend = backend or gemm_backend(dtype)
  if backend not in BACKENDS:
    raise ValueError(f"backend {backend!r}: not one of {BACKENDS}")
  if backend == "sve":
    from jpllm_jax import kernels_sve  # pylint: disable=import-outside-toplevel
    if dtype != jnp.float32:
      raise ValueError(f"the SVE kernel is fp32 only, not {dtype}")
    return kernels_sve.bdot(a, b)
  return jax.lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,))), precision=precision,
                             preferred_element_type=jnp.result_type(a.dtype, b.dtype))


def matmuls(lhs: Sequence[jax.Array], rhs: Sequence[jax.Array], the_plan: Plan | None = None,
            precision=jax.lax.Precision.HIGHEST, backend: str | None = None) -> list[jax.Array]:
  """`[a @ b for a, b in zip(lhs, rhs)]` as one batched product per bucket of `the_plan` (default: plan(...) of
  their shapes), on `backend` ("xla" | "sve"; default gemm_backend()). Call it under jit: the padding, stacking and
  slicing fuse around the dots."""
  shapes = [(a.shape[0], a.shape[1], b.shape[1]) for a, b in zip(lhs, rhs)]
  the_plan = the_plan or plan(shapes)
  if list(the_plan.shapes) != shapes:
    raise ValueError(f"plan is for shapes {the_plan.shapes}, not {shapes}")
  out: list[jax.Array | None] = [None] * len(shapes)
  for bucket in the_plan.buckets:
    m, k, n = bucket.shape
    a = _stack_padded([lhs[i] for i in bucket.members], m, k)
    b = _stack_padded([rhs[i] for i in bucket.members], k, n)
    c = _bdot(a, b, precision, backend)
    for j, i in enumerate(bucket.members):
      out[i] = c[j, :shapes[i][0], :shapes[i][2]]
  return out


def grouped_plan(group_sizes: Sequence[int], k: int, n: int, multiple: int | None = None,
                 max_waste: float = MAX_WASTE) -> Plan:
  """The plan of MoE expert groups: group e is a (group_sizes[e], k, n) GEMM."""
  return plan([(int(m), k, n) for m in group_sizes], multiple, max_waste)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: Sequence[int], the_plan: Plan | None = None,
                   precision=jax.lax.Precision.HIGHEST, backend: str | None = None) -> jax.Array:
  """Ragged grouped GEMM with sizes known when tracing: rows of x [T, K] sorted by group, group e's rows times
  w[e] [K, N]; equals jax.lax.ragged_dot(x, w, group_sizes). Groups of similar size share a batched dot
  (on `backend`, as in matmuls)."""
  sizes = [int(s) for s in group_sizes]
  if sum(sizes) != x.shape[0] or len(sizes) != w.shape[0]:
    raise ValueError(f"group sizes {sizes} do not split x {x.shape} over w {w.shape}")
  t, k = x.shape
  n = w.shape[2]
  the_plan = the_plan or grouped_plan(sizes, k, n)
  starts = [sum(sizes[:e]) for e in range(len(sizes))]
  pieces = [None] * len(sizes)
  for bucket in the_plan.buckets:
    m, kp, np_ = bucket.shape
    a = _stack_padded([jax.lax.slice_in_dim(x, starts[e], starts[e] + sizes[e]) for e in bucket.members], m, kp)
    members = list(bucket.members)
    b = w if members == list(range(w.shape[0])) else jnp.take(w, jnp.asarray(members), axis=0)
    if (kp, np_) != (k, n):
      b = jnp.pad(b, ((0, 0), (0, kp - k), (0, np_ - n)))
    c = _bdot(a, b, precision, backend)
    for j, e in enumerate(bucket.members):
      pieces[e] = c[j, :sizes[e], :n]
  return jnp.concatenate(pieces, axis=0) if pieces else jnp.zeros((t, n), x.dtype)
