"""Expert parallelism: `moe_ffn` with the experts sharded over a mesh axis and the tokens sent to them.

  y, stats = moe_ffn_expert_parallel(x_ND, expert_ids_NK, gates_NK, w_gate_EDF, w_up_EDF, w_down_EFD, mesh=mesh)

Layout (MaxText / DeepSeek style), in one `jax.shard_map`:
  tokens   [N, D], ids and gates [N, k]: sharded over `token_axes` (by default data, fsdp and expert: the expert
           ranks are data parallel outside the MoE layer), replicated over `tensor_axis`.
  experts  [E, D, F] / [E, F, D]: E over `expert_axis` (expert e lives on expert rank e // (E / n_ep)), F over
           `tensor_axis` (each tensor rank holds a slice of every local expert's FFN).

Each device packs its N_local*k assignments into one send buffer of S rows per expert rank, exchanges the
buffers with `jax.lax.all_to_all` over `expert_axis`, runs its E / n_ep local experts on the n_ep*S received rows
with `moe_ffn`'s grouped machinery (ops.expert_mixture: same layouts, same custom VJP; each received row
carries its gate, so the outputs come back weighted), sends them back with a second all_to_all and sums each
token's rows. The tensor ranks' partial down projections are summed with one psum over `tensor_axis` of
y [N_local, D]. Gradients are JAX's own transposes: all_to_all
transposes to all_to_all, and shard_map's varying-axis types add the psums over the replicated axes.

Dropless (capacity_factor None), S = N_local*k, the worst case of all assignments going to one rank: the send
and receive buffers then hold n_ep*N_local*k rows of D (n_ep times the routed activations; a dropless EP layer
with static shapes must pay this or a ragged collective). The local compute is still sized by the rows that
arrived: moe_ffn's dropless layouts pick by the largest group at run time, and their last resort, the block
layout, has blocks for all n_ep*N_local*k rows but skips those past the groups.

With a capacity factor c, moe_ffn's rule applies to each device's tokens: expert e takes at most
C = ceil(c * N_local * k / E) of the device's assignments, first come in token order, the rest are dropped and
counted. The buffer to each expert rank is then (E / n_ep) * C rows (= ceil(c * N_local * k / n_ep) when E
divides c * N_local * k), and the receiving rank computes a fixed [E / n_ep, n_ep * C] padded layout.

`jax.lax.ragged_all_to_all` would drop the n_ep factor, but XLA:CPU does not implement it (jax 0.10.2), so
the padded all_to_all is the only path here.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jpllm_jax.models.strategy import Strategy, probe
from jpllm_jax.moe import ops, tuning
from jpllm_jax.parallel.logical import Rules, logical_to_spec
from kernels_pallas import vma


def strategy(mesh: Mesh, rules: Rules) -> Strategy:
  """The model's parallel strategy on `mesh` under `rules`: expert parallelism when the mesh has an `expert` axis
  larger than 1 (tokens sharded like the `batch` axis, the experts' width like `mlp`), else the defaults."""
  if mesh.shape.get("expert", 1) == 1:
    return Strategy()
  batch = logical_to_spec(("batch",), rules)[0] or ()
  tensor = logical_to_spec(("mlp",), rules)[0]
  return Strategy(expert_ffn=functools.partial(
      moe_ffn_expert_parallel, mesh=mesh, token_axes=(batch,) if isinstance(batch, str) else tuple(batch),
      tensor_axis=tensor if isinstance(tensor, str) else None))


def moe_ffn_expert_parallel(x: jax.Array, expert_ids: jax.Array, gates: jax.Array, w_gate: jax.Array,
                            w_up: jax.Array, w_down: jax.Array, *, mesh: Mesh, expert_axis: str = "expert",
                            token_axes: Sequence[str] = ("data", "fsdp", "expert"),
                            tensor_axis: str | None = "tensor", capacity_factor: float | None = None,
                            impl: str = "auto", activation: str = "silu") -> tuple[jax.Array, dict]:
  """`moe_ffn` (same arguments, math and return values) with the experts sharded over `expert_axis`.

  Args:
    x: [N, D] tokens. expert_ids: int [N, k]. gates: [N, k]. w_gate, w_up: [E, D, F]. w_down: [E, F, D].
    mesh: the device mesh. expert_axis: the mesh axis that shards E; it must be one of token_axes.
    token_axes: mesh axes that shard N (absent ones are skipped). tensor_axis: the mesh axis that shards F
      (None: no tensor parallelism).
    capacity_factor: None for dropless; else moe_ffn's capacity applied to each device's N_local tokens.
    impl, activation: as in moe_ffn, for the local experts ("auto": "ragged" where moe_ffn picks "pallas";
      see `_local_experts`).
  Returns:
    y [N, D] sharded like x, and stats: "load" int32 [E] (all assignments, before dropping), "dropped" int32 []
    (summed over devices).
  """
  if impl not in ops.IMPLS:
    raise ValueError(f"impl must be one of {ops.IMPLS}, got {impl!r}")
  if expert_axis not in mesh.axis_names:
    raise ValueError(f"expert_axis {expert_axis!r} is not an axis of the mesh {mesh.axis_names}")
  tok = tuple(a for a in token_axes if a in mesh.axis_names)
  if expert_axis not in tok:
    raise ValueError(f"token_axes {tuple(token_axes)} must include expert_axis {expert_axis!r}: the expert ranks "
                     "hold different tokens")
  tp = tensor_axis if tensor_axis in mesh.axis_names else None
  if tp in tok:
    raise ValueError(f"tensor_axis {tp!r} cannot also shard the tokens ({tok})")
  n, k = expert_ids.shape
  num_experts, _, f = w_gate.shape
  n_ep, n_tok, n_tp = mesh.shape[expert_axis], math.prod(mesh.shape[a] for a in tok), mesh.shape[tp] if tp else 1
  if num_experts % n_ep:
    raise ValueError(f"{num_experts} experts are not divisible by the {n_ep} ranks of mesh axis {expert_axis!r}; "
                     "change the number of experts or the mesh")
  if n % n_tok:
    raise ValueError(f"{n} tokens are not divisible by the {n_tok} devices of token_axes {tok}")
  if f % n_tp:
    raise ValueError(f"expert width {f} is not divisible by the {n_tp} ranks of mesh axis {tp!r}")

  def local(x, ids, gates, wg, wu, wd):
    y, dropped, load = _dispatch_compute_combine(x, ids, gates, wg, wu, wd, num_experts=num_experts,
                                                 expert_axis=expert_axis, n_ep=n_ep,
                                                 capacity_factor=capacity_factor, impl=impl, activation=activation)
    if tp:
      y = jax.lax.psum(y, tp)
    return y, {"load": jax.lax.psum(load, tok), "dropped": jax.lax.psum(dropped, tok)}

  tokens, w_in, w_out = P(tok, None), P(expert_axis, None, tp), P(expert_axis, tp, None)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens, w_in, w_in, w_out),
                     out_specs=(tokens, {"load": P(), "dropped": P()}))
  return fn(x, expert_ids, gates, w_gate, w_up, w_down)


def moe_ffn_expert_local(x: jax.Array, expert_ids: jax.Array, gates: jax.Array, w_gate: jax.Array,
                         w_up: jax.Array, w_down: jax.Array, *, expert_axis: str = "expert",
                         capacity_factor: float | None = None, impl: str = "auto",
                         activation: str = "silu") -> tuple[jax.Array, dict]:
  """`moe_ffn_expert_parallel`'s per-device body, for a caller already inside a `shard_map` manual over
  `expert_axis` (a pipeline stage): x [n, D], ids and gates [n, k] are this device's tokens, w_* its E / n_ep
  local experts ([E / n_ep, D, F] / [E / n_ep, F, D]); a shard_map nested in the caller's would fail Shardy's
  verifier. The axes the caller leaves automatic (tensor) are partitioned by XLA. Returns y [n, D] and this
  device's stats, not summed over devices: "load" int32 [E] of its tokens, "dropped" int32 []."""
  if impl not in ops.IMPLS:
    raise ValueError(f"impl must be one of {ops.IMPLS}, got {impl!r}")
  n_ep = jax.lax.axis_size(expert_axis)
  y, dropped, load = _dispatch_compute_combine(x, expert_ids, gates, w_gate, w_up, w_down,
                                               num_experts=w_gate.shape[0] * n_ep, expert_axis=expert_axis,
                                               n_ep=n_ep, capacity_factor=capacity_factor, impl=impl,
                                               activation=activation)
  return probe("moe.experts", y), {"load": load, "dropped": dropped}


def _dispatch_compute_combine(x, ids, gates, wg, wu, wd, *, num_experts: int, expert_axis: str, n_ep: int,
                              capacity_factor: float | None, impl: str, activation: str):
  """One device's part: (y partial over the tensor axis [n, D], dropped int32 [], load int32 [E])."""
  n, k = ids.shape
  a = n * k
  e_local = num_experts // n_ep
  e_A = ids.reshape(-1).astype(jnp.int32)
  dest = e_A // e_local
  if capacity_factor is None:  # dropless: slots in token order within each destination, S = a.
    cap, slots = None, a
    slot, keep, _, _ = ops.route(dest, n_ep, None)
    load = jnp.zeros((num_experts,), jnp.int32).at[e_A].add(1)
  else:  # moe_ffn's capacity on this device's tokens; expert e's C slots sit at (e % e_local) * C.
    cap = int(math.ceil(capacity_factor * a / num_experts))
    slots = e_local * cap
    rank, keep, load, _ = ops.route(e_A, num_experts, cap)
    slot = (e_A % e_local) * cap + rank
  rows = n_ep * slots
  flat = jnp.where(keep, dest * slots + slot, rows)  # the assignment's send row (rows: dropped)
  send_src = jnp.full((rows,), a, jnp.int32).at[flat].set(jnp.arange(a, dtype=jnp.int32), mode="drop")
  send_x = jnp.take(x, send_src // k, axis=0, mode="fill", fill_value=0)
  send_g = jnp.take(gates.reshape(-1), send_src, mode="fill", fill_value=0)
  send_e = jnp.take(e_A % e_local, send_src, mode="fill", fill_value=e_local)  # e_local: empty row
  to_experts = lambda v: jax.lax.all_to_all(v, expert_axis, 0, 0, tiled=True)
  # The probes (train/nonfinite.py's checking run) see the rows each expert rank receives and computes, so a site
  # names the expert rank's devices (forward: its outputs; backward: the gradient at its inputs).
  x_R = probe("moe.expert_inputs", to_experts(send_x))
  out_R = _local_experts(x_R, to_experts(send_g), to_experts(send_e), wg, wu, wd, mean_rows=a,
                         group_cap=None if cap is None else n_ep * cap, impl=impl, activation=activation)
  out_R = probe("moe.experts", out_R)
  # The rows come back already weighted by their gates: each token sums its k rows (zeros where dropped).
  y = ops.combine(to_experts(out_R), flat, n).astype(x.dtype)
  return y, (a - keep.sum()).astype(jnp.int32), load


def _local_experts(x_R, gate_R, e_R, wg, wu, wd, *, mean_rows: int, group_cap: int | None, impl: str,
                   activation: str):
  """gate_R[r] * FFN_{e_R[r]}(x_R[r]) for each received row (zeros where e_R[r] == E_local, an empty row),
  through moe_ffn's expert_mixture (one assignment per row) with the layouts moe_ffn would pick: `mean_rows`
  rows expected, at most `group_cap` per expert."""
  e_local, rows = wg.shape[0], x_R.shape[0]
  valid = e_R < e_local
  rank, _, load, _ = ops.route(e_R, e_local + 1, None)  # empty rows form group e_local, after the real ones
  kept = load[:e_local]
  if impl == "auto":  # moe_ffn's choice, except the Pallas kernel (tuning.EP_INSTEAD_OF_PALLAS says why).
    impl = tuning.EP_INSTEAD_OF_PALLAS if ops.default_impl() == "pallas" else ops.default_impl()
  cfg = ops.experts_config(impl, 1, activation, mean_rows, e_local, group_cap, rows)
  # expert_mixture is a custom VJP: give every differentiable input the union of their varying mesh axes, so its
  # cotangents type-check; the transposes of these casts are the psums over the axes that replicate each input.
  x_R, gate_R, wg, wu, wd = vma.vary_alike(x_R, gate_R, wg, wu, wd)
  return ops.expert_mixture(cfg, x_R, gate_R, wg, wu, wd, jnp.where(valid, e_R, 0), rank, valid, kept)
