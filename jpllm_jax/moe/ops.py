"""Mixture-of-experts expert computation: dispatch token assignments to experts, run each expert's SwiGLU FFN,
combine the outputs weighted by the router's gates.

  y, stats = moe_ffn(x_ND, expert_ids_NK, gates_NK, w_gate_EDF, w_up_EDF, w_down_EFD)

The N*k (token, slot) assignments are ranked within their expert (first come in token order) and placed in a
row layout where each expert's assignments are contiguous, the expert FFNs run as grouped matmuls over that
layout, and each token gathers its assignments' output rows and sums them weighted by its gates. The implementations
differ in the layout and its grouped matmul:

  "ragged"  rows packed back to back; `jax.lax.ragged_dot`. The reference path, and XLA's own grouped matmul
            on TPU; XLA:CPU lowers it to a masked product over all experts (E times the work).
  "padded"  CPU: every expert gets the same C rows, so the matmuls are batched einsums [E, C, D] x [E, D, F]
            (the way Fugaku-LLM turned irregular GEMMs into regular ones). With a capacity, C is the capacity.
            Dropless, the largest group picks at run time (`lax.switch`) the first C = N*k/E * slack, slack in
            tuning.PADDED_SLACKS, that holds it, else an exact block layout: groups tiled into blocks of `block_rows`
            rows, each tagged with its expert, multiplied block by block (`blocked_mm`).
  "pallas"  the block layout with the Pallas GMM kernel (kernels_pallas/moe_dispatch.py): Triton on GPU,
            Mosaic on TPU (kernels_pallas/moe_gmm_tpu.py), the interpreter elsewhere (tests). Its gathers between
            tokens and rows and its combines are the Pallas row-DMA kernels of kernels_pallas/moe_permute.py
            where the program is lowered for TPU (or interpreted), XLA's gathers elsewhere (`permute`).
  "auto"    "padded" on CPU, "pallas" on GPU, "ragged" on TPU (the Mosaic kernel is not yet timed on a TPU).

Under an FP8 matmul policy (jpllm_jax.models.fp8, injected by the train step) the padded and blocked grouped
matmuls run as FP8 GEMMs, and "ragged" and "pallas" run the block layout with FP8 GEMMs per block.

`expert_mixture` (dispatch, experts and the gate-weighted combine) has one custom VJP for all layouts. It keeps
its residuals (the gate and up projections) in assignment order, so the switch's branches share them without
padding them to a common shape; its gathers between tokens and rows transpose to gathers (each kept assignment
owns one row), not scatters; and the gates' cotangent comes from the down projection's backward product
(<h, dy_row @ w_down^T>), so neither the outputs nor dy spread over the k assignments are kept.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jpllm_jax import cpu
from jpllm_jax.moe import tuning
from kernels_pallas import moe_dispatch, moe_permute, vma

IMPLS = ("auto", "ragged", "padded", "pallas")

def _layers():
  """jpllm_jax.models.layers (the activations, the house einsum), imported on first use: the MoE model under
  jpllm_jax/models imports this module."""
  from jpllm_jax.models import layers  # pylint: disable=import-outside-toplevel
  return layers


def _round_up(a: int, b: int) -> int:
  return -(-a // b) * b


def default_impl() -> str:
  """The implementation "auto" picks on the default backend (the platform profile's, from tuning.IMPL_BY_BACKEND;
  module docstring)."""
  return cpu.profile().moe_impl(jax.default_backend())


def default_block_rows(assignments: int, num_experts: int) -> int:
  """Rows per block of the block layout: a power of two near a fraction of the mean group (tuning.py)."""
  mean = max(1, assignments // (tuning.BLOCKS_PER_MEAN_GROUP * num_experts))
  return int(min(tuning.BLOCK_ROWS_MAX, max(tuning.BLOCK_ROWS_MIN, 2 ** int(math.log2(mean)))))


# ------------------------------------------------------------------------------------------- routing
def route(expert_ids: jax.Array, num_experts: int, capacity: int | None):
  """Ranks the assignments within their expert. Returns (rank, keep, load, kept): each assignment's position
  among its expert's assignments in token order, whether it is under the capacity, and the per-expert
  counts before and after dropping."""
  e = expert_ids.reshape(-1).astype(jnp.int32)
  a = e.shape[0]
  order = jnp.argsort(e, stable=True)
  load = jnp.zeros((num_experts,), jnp.int32).at[e].add(1)
  start = jnp.cumsum(load) - load
  rank = jnp.zeros((a,), jnp.int32).at[order].set(jnp.arange(a, dtype=jnp.int32) - start[e[order]])
  if capacity is None:
    return rank, jnp.ones((a,), bool), load, load
  return rank, rank < capacity, load, jnp.minimum(load, capacity)


def _rows(e_A, rank, keep, base, rows: int) -> tuple[jax.Array, jax.Array]:
  """(row_src [rows], row_of [A]) when expert e's kept assignments fill rows base[e], base[e] + 1, ...:
  the assignment in each row (A for an empty row) and the row of each assignment (`rows` if dropped)."""
  a = e_A.shape[0]
  row_of = jnp.where(keep, base[e_A] + rank, rows).astype(jnp.int32)
  row_src = jnp.full((rows,), a, jnp.int32).at[row_of].set(jnp.arange(a, dtype=jnp.int32), mode="drop")
  return row_src, row_of


def block_tables(kept, block_rows: int, max_kept: int):
  """The block layout: each expert's kept assignments padded to whole blocks of block_rows rows, blocks in
  expert order. Returns (blocks, row base [E], block_expert [blocks] (E past the groups), block_offsets
  [E + 1]). The static block count covers any routing: sum_e ceil(kept_e / B) <= (max_kept + E (B - 1)) // B."""
  num_experts = kept.shape[0]
  nb = (max_kept + num_experts * (block_rows - 1)) // block_rows
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(-(-kept // block_rows)).astype(jnp.int32)])
  block_expert = jnp.searchsorted(offsets[1:], jnp.arange(nb, dtype=jnp.int32), side="right").astype(jnp.int32)
  return nb, offsets[:-1] * block_rows, block_expert, offsets


# ------------------------------------------------------------------------------- grouped matmuls
def _padded_mm(rows, w_EKN):
  """Equal groups: [E * C, K] x [E, K, N] as one batched einsum."""
  e = w_EKN.shape[0]
  out = _layers().matmul("eck,ekn->ecn", rows.reshape(e, -1, rows.shape[-1]), w_EKN, name="experts")
  return out.reshape(rows.shape[0], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def blocked_mm(rows, w_EKN, block_expert, block_rows: int):
  """The block layout in plain XLA: a loop over the row blocks, each times the weight of its expert (blocks of
  expert E are skipped: their rows are empty). Looping rather than batching against gathered weights keeps the
  memory at one weight matrix; the custom VJP loops the same way for d rows and accumulates dW per expert."""
  num_experts, k, n = w_EKN.shape

  def body(_, blk):
    r, e = blk
    zeros = lambda: vma.zeros((block_rows, n), r.dtype, r, w_EKN)  # (varying like the product, in shard_map)
    return None, jax.lax.cond(e < num_experts, lambda: r @ w_EKN[e], zeros)

  _, out = jax.lax.scan(body, None, (rows.reshape(-1, block_rows, k), block_expert))
  return out.reshape(rows.shape[0], n)


def _blocked_mm_fwd(rows, w_EKN, block_expert, block_rows):
  return blocked_mm(rows, w_EKN, block_expert, block_rows), (rows, w_EKN, block_expert)


def _blocked_mm_bwd(block_rows, res, dout):
  rows, w_EKN, block_expert = res
  num_experts, k, n = w_EKN.shape

  def body(dw, blk):
    r, d, e = blk
    used = e < num_experts
    e = jnp.minimum(e, num_experts - 1)
    dr = jax.lax.cond(used, lambda: d @ w_EKN[e].T, lambda: vma.zeros((block_rows, k), d.dtype, d, w_EKN))
    dw = jax.lax.cond(used, lambda: dw.at[e].add(r.T @ d), lambda: dw)
    return dw, dr

  blocks = (rows.reshape(-1, block_rows, k), dout.reshape(-1, block_rows, n), block_expert)
  dw, drows = jax.lax.scan(body, vma.zeros(w_EKN.shape, jnp.float32, rows, dout), blocks)
  return drows.reshape(rows.shape).astype(rows.dtype), dw.astype(w_EKN.dtype), None


blocked_mm.defvjp(_blocked_mm_fwd, _blocked_mm_bwd)


def _fp8_policy():
  """The injected FP8 policy of the routed experts (jpllm_jax.models.fp8), or None."""
  from jpllm_jax.models import fp8  # pylint: disable=import-outside-toplevel
  return fp8.current("experts")


def blocked_mm_fp8(pol, rows, w_EKN, block_expert, block_rows: int):
  """`blocked_mm` with each block's product an FP8 GEMM of `pol` (differentiated through the loop: the GEMM's own
  VJP makes dgrad and wgrad FP8 too)."""
  from jpllm_jax.models import fp8  # pylint: disable=import-outside-toplevel
  num_experts, k, n = w_EKN.shape

  def body(_, blk):
    r, e = blk
    zeros = lambda: vma.zeros((block_rows, n), r.dtype, r, w_EKN)
    product = lambda: fp8.einsum(pol, "mk,kn->mn", r, w_EKN[jnp.minimum(e, num_experts - 1)]).astype(r.dtype)
    return None, jax.lax.cond(e < num_experts, product, zeros)

  _, out = jax.lax.scan(body, None, (rows.reshape(-1, block_rows, k), block_expert))
  return out.reshape(rows.shape[0], n)


def _layout(spec: tuple, e_A, rank, keep, kept, max_kept: int):
  """(row_src, row_of, mm) of a layout spec: ("ragged",), ("padded", C), ("blocked", B), ("pallas", B,
  interpret, permute backend); mm(rows, w [E, K, N]) is the layout's grouped matmul."""
  kind = spec[0]
  num_experts = kept.shape[0]
  if kind == "ragged":
    row_src, row_of = _rows(e_A, rank, keep, jnp.cumsum(kept) - kept, e_A.shape[0])
    return row_src, row_of, lambda r, w: jax.lax.ragged_dot(r, w, kept)
  if kind == "padded":
    c = spec[1]
    row_src, row_of = _rows(e_A, rank, keep, jnp.arange(num_experts, dtype=jnp.int32) * c, num_experts * c)
    return row_src, row_of, _padded_mm
  bm = spec[1]
  nb, base, block_expert, offsets = block_tables(kept, bm, max_kept)
  row_src, row_of = _rows(e_A, rank, keep, base, nb * bm)
  if kind == "blocked":
    if (pol := _fp8_policy()) is not None:
      return row_src, row_of, lambda r, w: blocked_mm_fp8(pol, r, w, block_expert, bm)
    return row_src, row_of, lambda r, w: blocked_mm(r, w, block_expert, bm)
  if kind == "pallas":
    return row_src, row_of, lambda r, w: moe_dispatch.grouped_matmul(r, w, block_expert, offsets, bm, spec[2])
  raise ValueError(f"unknown layout {spec!r}")


class _Config(NamedTuple):
  """Static settings of `expert_mixture`: slots per token, activation, layouts and when each is used."""
  k: int
  activation: str
  max_kept: int  # static bound on the kept assignments
  layouts: tuple  # layout specs; layout i is used when the largest kept group is <= limits[i] (last: always)
  limits: tuple


def _branch_index(cfg: _Config, kept):
  if len(cfg.layouts) == 1:
    return None
  return (kept.max() > jnp.asarray(cfg.limits, jnp.int32)).sum()


def _after(x, *done):
  """x, made to depend on `done`: XLA:CPU runs independent matmuls concurrently, each on all cores, so two that
  overlap compete for the same cores; in sequence each has them all."""
  return jax.lax.optimization_barrier((x, *done))[0]


def combine(rows, row_of, n: int, weights_A=None):
  """y [n, D]: each token's assignments' rows (row_of [n * k]; zeros where past the rows), summed, weighted by
  weights_A [n * k] if given."""
  picked = jnp.take(rows, row_of, axis=0, mode="fill", fill_value=0).reshape(n, -1, rows.shape[-1])
  if weights_A is not None:
    picked = picked * weights_A.reshape(n, -1, 1).astype(rows.dtype)
  return picked.sum(1)


def _take_rows(v, idx):
  return jnp.take(v, idx, axis=0, mode="fill", fill_value=0)


def _permutes(cfg: _Config, spec) -> tuple:
  """(take_rows(v [T, D], idx [R]), combine(rows, row_of, n, weights_A=None)) of a layout: the XLA gathers, or
  for "pallas" kernels_pallas/moe_permute.py's with the GMM's interpret flag (zeros past the rows either way)."""
  if spec[0] != "pallas":
    return _take_rows, combine
  kw = dict(interpret=spec[2], backend=spec[3])
  return (functools.partial(moe_permute.gather_rows, **kw),
          lambda rows, row_of, n, weights_A=None: moe_permute.gather_combine(rows, row_of, weights_A, k=cfg.k, **kw))


def _forward(cfg: _Config, spec, x, weights_A, w_gate, w_up, w_down, e_A, rank, keep, kept):
  """The gate-weighted expert outputs y [N, D], and the gate and up projections [A, F] (residuals)."""
  row_src, row_of, mm = _layout(spec, e_A, rank, keep, kept, cfg.max_kept)
  take, comb = _permutes(cfg, spec)
  x_rows = take(x, row_src // cfg.k)
  g = mm(x_rows, w_gate)
  u = mm(_after(x_rows, g), w_up)
  out = mm(_layers().activation(cfg.activation, g) * u, w_down)
  return comb(out, row_of, x.shape[0], weights_A).astype(x.dtype), take(g, row_of), take(u, row_of)


def _backward(cfg: _Config, spec, x, weights_A, w_gate, w_up, w_down, e_A, rank, keep, kept, g_A, u_A, dy):
  """Cotangents of (x, weights_A, w_gate, w_up, w_down). With q = dy_row @ w_down^T per row, the down
  projection's input gets weight * q and the row's gate weight gets <h, q> (= <out, dy_row>), so the combine
  needs neither the outputs as residuals nor dy spread over the k assignments."""
  row_src, row_of, mm = _layout(spec, e_A, rank, keep, kept, cfg.max_kept)
  take, comb = _permutes(cfg, spec)
  x_rows = take(x, row_src // cfg.k)
  dy_rows = take(dy, row_src // cfg.k)
  w_rows = _take_rows(weights_A, row_src).astype(dy.dtype)[:, None]  # (1-D: XLA's gather in every layout)
  h, act_vjp = jax.vjp(lambda g, u: _layers().activation(cfg.activation, g) * u, take(g_A, row_src),
                       take(u_A, row_src))
  q = jax.vjp(mm, h, w_down)[1](dy_rows)[0]  # (the unused forward and weight products are dead code)
  dw_down = jax.vjp(mm, w_rows.astype(h.dtype) * h, w_down)[1](dy_rows)[1]
  dweights_rows = (h.astype(jnp.float32) * q.astype(jnp.float32)).sum(-1)
  dweights_A = jnp.take(dweights_rows, row_of, mode="fill", fill_value=0).astype(weights_A.dtype)
  dg, du = act_vjp(w_rows.astype(q.dtype) * q)
  # Left concurrent (no _after): the backward's matmuls are large enough that sequencing them gains nothing.
  dx_g, dw_gate = jax.vjp(mm, x_rows, w_gate)[1](dg)
  dx_u, dw_up = jax.vjp(mm, x_rows, w_up)[1](du)
  dx = comb(dx_g + dx_u, row_of, x.shape[0]).astype(x.dtype)
  return dx, dweights_A, dw_gate, dw_up, dw_down


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def expert_mixture(cfg: _Config, x, weights_A, w_gate, w_up, w_down, e_A, rank, keep, kept):
  """y[n] = sum_j weights_A[n * k + j] * FFN_{e_A[n * k + j]}(x[n]) over the token's kept assignments, in the
  first layout of cfg whose limit holds the largest kept group. Its VJP keeps the residuals in assignment
  order, so the layouts (chosen with `lax.switch`) need no common residual shapes."""
  return _expert_mixture_fwd(cfg, x, weights_A, w_gate, w_up, w_down, e_A, rank, keep, kept)[0]


def _unprobed():
  """FP8 statistics off (jpllm_jax.models.fp8): this custom VJP cannot pass a cotangent to their closed-over probe."""
  from jpllm_jax.models import fp8  # pylint: disable=import-outside-toplevel
  return fp8.unprobed()


def _expert_mixture_fwd(cfg, x, weights_A, w_gate, w_up, w_down, e_A, rank, keep, kept):
  args = (x, weights_A, w_gate, w_up, w_down, e_A, rank, keep, kept)
  idx = _branch_index(cfg, kept)
  with _unprobed():
    if idx is None:
      y, g_A, u_A = _forward(cfg, cfg.layouts[0], *args)
    else:
      y, g_A, u_A = jax.lax.switch(idx, [functools.partial(_forward, cfg, s) for s in cfg.layouts], *args)
  return y, (args, g_A, u_A, idx)


def _expert_mixture_bwd(cfg, res, dy):
  args, g_A, u_A, idx = res
  with _unprobed():
    if idx is None:
      grads = _backward(cfg, cfg.layouts[0], *args, g_A, u_A, dy)
    else:
      grads = jax.lax.switch(idx, [functools.partial(_backward, cfg, s) for s in cfg.layouts], *args, g_A, u_A,
                             dy)
  return (*grads, None, None, None, None)


expert_mixture.defvjp(_expert_mixture_fwd, _expert_mixture_bwd)


# ------------------------------------------------------------------------------------ the op
def moe_ffn(x: jax.Array, expert_ids: jax.Array, gates: jax.Array, w_gate: jax.Array, w_up: jax.Array,
            w_down: jax.Array, *, impl: str = "auto", capacity_factor: float | None = None,
            activation: str = "silu", block_rows: int | None = None,
            interpret: bool | None = None, permute: str = "auto") -> tuple[jax.Array, dict]:
  """Routed SwiGLU experts: y[n] = sum_j gates[n, j] * down(act(x[n] @ w_gate[e]) * (x[n] @ w_up[e])), e =
  expert_ids[n, j].

  Args:
    x: [N, D] tokens. expert_ids: int [N, k]. gates: [N, k], already normalised by the router.
    w_gate, w_up: [E, D, F]. w_down: [E, F, D].
    impl: "auto", "ragged", "padded" or "pallas" (module docstring).
    capacity_factor: None for dropless; else each expert takes at most ceil(c * N * k / E) assignments, first
      come in token order, and the rest are dropped (contribute 0).
    activation: the gate activation (models.layers.activation).
    block_rows: rows per block of the block layout ("pallas", and the last "padded" fallback); default by size.
    interpret: run the Pallas kernels in the interpreter (default: the GMM on CPU; the gathers and combines only
      when True, since TPU interpretation of their DMAs is slow).
    permute: the backend of "pallas"'s gathers and combines (kernels_pallas.moe_permute.BACKENDS): "auto" (the
      Mosaic row-DMA kernels when lowered for TPU or interpret=True, else XLA's), "mosaic" or "xla".
  Returns:
    y [N, D] in x's dtype, and stats: "load" int32 [E] assignments routed to each expert before dropping,
    "dropped" int32 [] assignments dropped by the capacity.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  impl = default_impl() if impl == "auto" else impl
  n, k = expert_ids.shape
  num_experts = w_gate.shape[0]
  a = n * k
  capacity = None if capacity_factor is None else int(math.ceil(capacity_factor * a / num_experts))
  max_kept = a if capacity is None else min(a, capacity * num_experts)
  e_A = expert_ids.reshape(-1).astype(jnp.int32)
  rank, keep, load, kept = route(e_A, num_experts, capacity)
  cfg = experts_config(impl, k, activation, a, num_experts, capacity, max_kept, block_rows, interpret, permute)
  y = expert_mixture(cfg, x, gates.reshape(-1), w_gate, w_up, w_down, e_A, rank, keep, kept)
  return y, {"load": load, "dropped": (a - kept.sum()).astype(jnp.int32)}


def experts_config(impl: str, k: int, activation: str, assignments: int, num_experts: int, capacity: int | None,
                   max_kept: int, block_rows: int | None = None, interpret: bool | None = None,
                   permute: str = "auto") -> _Config:
  """The static settings of `expert_mixture` for a resolved `impl` (not "auto"): its layouts and when each is
  used, for `assignments` rows expected over `num_experts` experts, at most `capacity` per expert."""
  bm = block_rows or default_block_rows(assignments, num_experts)
  if impl in ("ragged", "pallas") and _fp8_policy() is not None:
    impl = "blocked"  # neither ragged_dot nor the Pallas GMM takes block-scaled FP8 operands yet
  if impl == "padded":
    layouts, limits = _padded_layouts(assignments, num_experts, capacity, max_kept, bm)
  else:
    spec = {"pallas": (impl, bm, interpret, permute), "blocked": (impl, bm)}.get(impl, (impl,))
    layouts, limits = (spec,), ()
  return _Config(k, activation, max_kept, layouts, limits)


def _padded_layouts(a: int, num_experts: int, capacity: int | None, max_kept: int, block_rows: int):
  """(layouts, limits) of "padded": with a capacity, one padded layout of that many rows per expert. Dropless,
  padded layouts of N*k/E times each of tuning.PADDED_SLACKS rows (the largest group picks the first that holds it),
  then one for any routing: the block layout, or padded with all rows for each expert where that is cheaper
  (few experts)."""
  if capacity is not None:
    return (("padded", _round_up(capacity, tuning.ROW_MULTIPLE)),), ()
  layouts, limits = [], []
  for slack in tuning.PADDED_SLACKS:
    c = _round_up(math.ceil(a / num_experts * slack), tuning.ROW_MULTIPLE)
    if c >= max_kept:
      break
    if not limits or c > limits[-1]:
      layouts.append(("padded", c))
      limits.append(c)
  last_c = _round_up(max_kept, tuning.ROW_MULTIPLE)
  blocked_rows = (max_kept + num_experts * (block_rows - 1)) // block_rows * block_rows
  # A padded row costs about 0.8 of a blocked one (batched, not looped).
  layouts.append(("padded", last_c) if 4 * num_experts * last_c <= 5 * blocked_rows else ("blocked", block_rows))
  return tuple(layouts), tuple(limits)


def moe_ffn_reference(x: jax.Array, expert_ids: jax.Array, gates: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                      w_down: jax.Array, *, capacity_factor: float | None = None,
                      activation: str = "silu") -> jax.Array:
  """`moe_ffn` the obvious way: every token through every expert, combined with a dense [N, E] weight that
  holds the (kept) gates. Costs E times the routed FLOPs; for tests."""
  n, k = expert_ids.shape
  num_experts = w_gate.shape[0]
  onehot_AE = jax.nn.one_hot(expert_ids.reshape(-1), num_experts, dtype=jnp.int32)
  keep = jnp.ones((n * k,), bool)
  if capacity_factor is not None:
    earlier = jnp.cumsum(onehot_AE, axis=0) - onehot_AE  # assignments to the same expert before this one
    keep = (earlier * onehot_AE).sum(1) < math.ceil(capacity_factor * n * k / num_experts)
  weight_NE = jnp.einsum("nke,nk->ne", onehot_AE.reshape(n, k, num_experts).astype(gates.dtype),
                         gates * keep.reshape(n, k))
  h_NEF = _layers().activation(activation, jnp.einsum("nd,edf->nef", x, w_gate)) * jnp.einsum("nd,edf->nef", x, w_up)
  y_NED = jnp.einsum("nef,efd->ned", h_NEF, w_down)
  return jnp.einsum("ned,ne->nd", y_NED, weight_NE.astype(y_NED.dtype)).astype(x.dtype)
