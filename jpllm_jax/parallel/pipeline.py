"""Pipeline parallelism in one `jax.jit` program: a tick table (pipeline_schedule.py) run by `shard_map` over `stage`.

  loss, aux, grads = pipeline_value_and_grad(stage_fn, embed_fn, loss_fn, stage_params, shared_params,
                                             microbatches, mesh=mesh, schedule=make_schedule("1f1b", 4, 8))

The model comes in three pieces: `embed_fn(shared, batch) -> h` (first virtual stage), `stage_fn(layers, h, batch,
v) -> h` or `(h, loss term, dict of other sums)` (a block of stacked layers of virtual stage v, a traced int; the
micro-batch gives it positions and segment ids; a loss term, e.g. MoE balance losses, is added to the loss sum and
differentiated), `loss_fn(shared, h, batch) -> (token-weighted loss sum, token count[, dict of other sums])` (last
virtual stage; the sums of both come back in aux, added by key). `stage_params` leaves have a leading layer axis
L; device s runs chunk c = layer block c S + s (L / (S V) layers each, Megatron's interleaved layout; V = 1:
contiguous blocks).

Each device scans over the ticks of its own schedule row. A tick stores the messages that arrived into the
input / cotangent buffers (the schedule's slots), runs one branch of a `lax.switch` (idle, forward or backward),
and sends the forward output to the next device and the input cotangent to the previous one with `lax.ppermute`.
Only the chosen branch runs, so a device spends one forward or one backward per tick. A forward runs the stage
under `jax.vjp` (`split_vjp`) and keeps the pullback's residuals in the schedule's residual slot; its backward
rebuilds the pullback from them, without recomputing the stage. What the residuals are is the stage's remat
policy: its activations without one, the dots' outputs under `checkpoint_dots`, the layers' inputs under per-layer
`jax.checkpoint`, the stage input alone with the whole stage under `jax.checkpoint` (then the backward recomputes
it). Memory per device is the residual slots (1F1B: at most S micro-batches, GPipe: M) times one stage's
residuals. The last virtual stage's forward also runs final norm, head and loss and their backward at once and
leaves the cotangent of its output for its own backward; the first virtual stage's backward redoes the embedding
lookup for its gradient.

Gradients of the shared parameters (embedding, head; tied or not) are summed over the stages with one psum;
the loss and the gradients are divided by the total token count at the end, so they equal `jax.value_and_grad`
of sum(loss sums) / sum(token counts). `stage_axis` and `batch_axes` are manual (`expert` among them for expert
parallelism inside the stages: leaves sharded over it by `stage_specs` / `shared_specs`); the other mesh axes
(tensor) stay automatic, so the stage functions may carry their own sharding constraints for them. A stage
function may use collectives over the batch axes: the devices of one stage take the same branch at every tick.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.interpreters import partial_eval as pe  # the known / unknown split of a jaxpr, as jax.linearize does
from jax.sharding import Mesh, PartitionSpec as P

from jpllm_jax.parallel.pipeline_schedule import BACKWARD, FORWARD, Schedule

# Device row columns: branch, micro-batch, chunk, the rows the op reads (stage input, cotangent, residuals; clipped
# to 0), the rows arriving messages are written to, and the rows the op writes (residuals, the loss's cotangent).
(_CODE, _MICRO, _CHUNK, _SLOT, _GSLOT, _RSLOT, _RECV, _GRECV, _RWRITE, _GWRITE) = range(10)


def device_rows(schedule: Schedule) -> np.ndarray:
  """int32 [S, T, 10]: per device and tick the switch branch (0 idle, 1 + 2 first + last: forward, 5 + first:
  backward), the micro-batch, the chunk, the read rows, the receive rows and the write rows (-1: none)."""
  act, field = schedule.field("action"), schedule.field
  fwd, bwd, first, last = act == FORWARD, act == BACKWARD, schedule.is_first(), schedule.is_last()
  code = np.where(fwd, 1 + 2 * first + last, np.where(bwd, 5 + first, 0))
  cols = [code, field("micro"), field("chunk"), np.maximum(field("slot"), 0),
          np.where(bwd, np.maximum(field("grad_slot"), 0), 0), np.where(bwd, np.maximum(field("res_slot"), 0), 0),
          field("recv_slot"), field("recv_grad_slot"), np.where(fwd, field("res_slot"), -1),
          np.where(fwd & last, field("grad_slot"), -1)]
  return np.stack(cols, -1).transpose(1, 0, 2).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class SplitVJP:
  """`jax.vjp` of `fn(*args) -> (out, aux)` cut into a forward and a backward that may run ticks apart.

  `forward(*args) -> (out, aux, residuals)` returns only the pullback's residuals that depend on the args in
  `store_argnums` (a stage's input: the micro-batch's activations, as many as fn's remat policy saves).
  `backward(residuals, ct, *args)` recomputes the other residuals from the other args (the parameters themselves,
  their casts to the compute dtype, masks from positions: so no slot holds a copy of the weights), rebuilds the
  pullback and returns the cotangents of all args; the args in `store_argnums` are not read there (pass None)."""
  forward_fn: Callable  # flat args -> flat (out, aux), then the stored residuals
  rebuild_fn: Callable  # flat args outside store_argnums -> the other residuals
  stored: tuple[bool, ...]  # per pullback leaf
  residuals: tuple[jax.ShapeDtypeStruct, ...]  # the stored ones
  pullback: Any  # the pullback's treedef
  out_tree: Any
  store_argnums: tuple[int, ...]

  def forward(self, *args):
    flat = self.forward_fn(*jax.tree.leaves(args))
    out, aux = jax.tree.unflatten(self.out_tree, flat[:self.out_tree.num_leaves])
    return out, aux, tuple(flat[self.out_tree.num_leaves:])

  def backward(self, residuals, ct, *args):
    known = [x for i, a in enumerate(args) if i not in self.store_argnums for x in jax.tree.leaves(a)]
    stored, rebuilt = iter(residuals), iter(self.rebuild_fn(*known))
    leaves = [next(stored) if s else next(rebuilt) for s in self.stored]
    return jax.tree.unflatten(self.pullback, leaves)(ct)


def split_vjp(fn: Callable, *args, store_argnums: tuple[int, ...] = (1,)) -> SplitVJP:
  """Traces `jax.vjp(fn, *args, has_aux=True)` once (args may be abstract) and sorts its pullback's residuals by
  partial evaluation of their jaxpr with the args in `store_argnums` unknown: those depending on them are stored."""
  trees = {}

  def traced(*args):
    out, pullback, aux = jax.vjp(fn, *args, has_aux=True)
    outs, trees["out"] = jax.tree.flatten((out, aux))
    res, trees["pullback"] = jax.tree.flatten(pullback)
    return outs + res

  closed = jax.make_jaxpr(traced)(*args)
  n_out = trees["out"].num_leaves
  unknown = [i in store_argnums for i, a in enumerate(args) for _ in jax.tree.leaves(a)]
  known, _, out_unknown, _ = pe.partial_eval_jaxpr_nounits(closed, unknown, instantiate=False)
  stored = tuple(out_unknown[n_out:])
  rebuilt = [i >= n_out for i, u in enumerate(out_unknown) if not u]  # known: its known outputs, then residuals
  avals = [a for a, s in zip(closed.out_avals[n_out:], stored) if s]
  return SplitVJP(_pruned(closed, [True] * n_out + list(stored)),
                  _pruned(known, rebuilt + [False] * (len(known.out_avals) - len(rebuilt))), stored,
                  tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals), trees["pullback"], trees["out"],
                  tuple(store_argnums))


def _pruned(closed, used: list[bool]) -> Callable:
  """The closed jaxpr as a function of its flat inputs, computing only the `used` outputs."""
  jaxpr, _ = pe.dce_jaxpr(pe.convert_constvars_jaxpr(closed.jaxpr), used, instantiate=True)
  return lambda *flat: jax.core.eval_jaxpr(jaxpr, (), *closed.consts, *flat)


def pipeline_value_and_grad(stage_fn: Callable, embed_fn: Callable, loss_fn: Callable, stage_params: Any,
                            shared_params: Any, microbatches: Any, *, mesh: Mesh, schedule: Schedule,
                            stage_axis: str = "stage", batch_axes: tuple[str, ...] = (), stage_specs: Any = None,
                            shared_specs: Any = None) -> tuple[jax.Array, dict, tuple[Any, Any]]:
  """Loss, aux and gradients (stage_params', shared_params') of the pipelined model over all micro-batches.

  Args:
    stage_fn, embed_fn, loss_fn: the model's pieces (module docstring).
    stage_params: pytree of [L, ...] stacked layers (L may differ between leaves: several stacks).
    shared_params: pytree used by embed_fn and loss_fn.
    microbatches: pytree of [M, ...] arrays, one row per micro-batch.
    mesh: a mesh with `stage_axis` of size schedule.stages. schedule: from `make_schedule`.
    batch_axes: mesh axes that split every micro-batch's rows (axis 1 of the microbatches' leaves) and are manual
      too: each data-parallel group runs its own pipeline on its rows with the parameters gathered over these axes
      (FSDP with a pipeline is ZeRO-1/2, as in DeepSpeed), its gradients summed over them at the end.
    stage_specs, shared_specs: None, or pytree prefixes of stage_params / shared_params of PartitionSpecs of the
      leaves' dimensions (stage_params: after the layer axis) over batch axes that shard them inside the stages
      too, e.g. the experts' E over `expert` (expert parallelism: the stage functions exchange tokens with
      all_to_all over it). Such a leaf's gradients are not summed over its axes.
  Returns:
    loss = sum of loss sums / sum of token counts, aux {"loss_sum", "tokens", **loss_fn's other sums (summed,
    not divided)}, grads (stage, shared).
  """
  S, V, M = schedule.stages, schedule.virtual, schedule.micro_batches
  if mesh.shape[stage_axis] != S:
    raise ValueError(f"schedule has {S} stages but mesh axis {stage_axis!r} has {mesh.shape[stage_axis]} devices")
  n_layers = {w.shape[0] for w in jax.tree.leaves(stage_params)}
  if any(n % (S * V) for n in n_layers):
    raise ValueError(f"stage_params need leading layer counts divisible by stages x virtual_stages = {S * V}, "
                     f"got {sorted(n_layers)}")
  n_mb = {x.shape[0] for x in jax.tree.leaves(microbatches)}
  if n_mb != {M}:
    raise ValueError(f"microbatches need a leading axis of {M} (the schedule's micro-batches), got {sorted(n_mb)}")
  chunked = jax.tree.map(lambda w: w.reshape(V, S, w.shape[0] // (S * V), *w.shape[1:]), stage_params)
  rows = jnp.asarray(device_rows(schedule))
  batch_axes = tuple(a for a in batch_axes if mesh.shape[a] > 1)
  stage_specs = _leaf_specs(stage_specs, stage_params, lambda spec: P(None, stage_axis, None, *spec))
  shared_specs = _leaf_specs(shared_specs, shared_params, lambda spec: spec)
  sharded_axes = lambda specs: jax.tree.map(_spec_axes, specs, is_leaf=lambda x: isinstance(x, P))  # noqa: E731
  body = functools.partial(_device_program, stage_fn, embed_fn, loss_fn, schedule=schedule, axis=stage_axis,
                           batch_axes=batch_axes, stage_sharded=sharded_axes(stage_specs),
                           shared_sharded=sharded_axes(shared_specs))
  run = jax.shard_map(body, mesh=mesh, axis_names={stage_axis, *batch_axes},
                      in_specs=(stage_specs, shared_specs, P(None, batch_axes or None), P(stage_axis)),
                      out_specs=(P(), P(), P(), stage_specs, shared_specs))
  loss_sum, tokens, extra, g_stage, g_shared = run(chunked, shared_params, microbatches, rows)
  g_stage = jax.tree.map(lambda g, w: (g / tokens).reshape(w.shape).astype(w.dtype), g_stage, stage_params)
  g_shared = jax.tree.map(lambda g, w: (g / tokens).astype(w.dtype), g_shared, shared_params)
  return loss_sum / tokens, {**extra, "loss_sum": loss_sum, "tokens": tokens}, (g_stage, g_shared)


def _leaf_specs(specs, params, full: Callable):
  """One PartitionSpec per leaf of `params`: `full` of the leaf's spec in the prefix tree `specs` (P() if None)."""
  specs = jax.tree.map(lambda _: P(), params) if specs is None else specs
  return jax.tree.map(lambda spec, sub: jax.tree.map(lambda _: full(spec), sub), specs, params,
                      is_leaf=lambda x: isinstance(x, P))


def _spec_axes(spec: P) -> tuple[str, ...]:
  """The mesh axes named in `spec`."""
  return tuple(a for part in spec if part is not None for a in ((part,) if isinstance(part, str) else part))


def _psum_except(tree, axes: tuple[str, ...], sharded):
  """Each leaf summed over `axes` except those it is sharded on (`sharded`: a tuple of axes per leaf)."""
  def one(x, own):
    rest = tuple(a for a in axes if a not in own)
    return lax.psum(x, rest) if rest else x
  return jax.tree.map(one, tree, sharded)


def _vary(tree, axes: tuple[str, ...]):
  """Casts every leaf to vary over the manual axes (the per-device values of the scan carry and branches)."""
  def cast(x):
    missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
    return lax.pcast(x, missing, to="varying") if missing else x
  return jax.tree.map(cast, tree)


def _device_program(stage_fn, embed_fn, loss_fn, params, shared, batches, rows, *, schedule: Schedule, axis: str,
                    batch_axes: tuple[str, ...], stage_sharded, shared_sharded):
  """One device's scan over its schedule row; returns its loss sum, token count and gradient sums."""
  S, manual = schedule.stages, (axis, *batch_axes)
  vary = functools.partial(_vary, axes=manual)
  params = vary(jax.tree.map(lambda w: w[:, 0], params))  # [V, layers per chunk, ...]
  # Varying copies: their gradients stay per device (no implicit psum inside a branch); summed once below.
  shared, batches = vary(shared), vary(batches)
  batch0 = jax.tree.map(lambda b: b[0], batches)
  h = jax.eval_shape(embed_fn, shared, batch0)
  zeros = lambda tree: vary(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree))  # noqa: E731
  p0, x0, v0 = jax.tree.map(lambda w: w[0], params), zeros(h), vary(jnp.zeros((), jnp.int32))

  def run_stage(p, x, batch, v):  # ((y, loss term), other sums) whatever stage_fn returns
    out = stage_fn(p, x, batch, v)
    y, l, e = out if isinstance(out, tuple) else (out, jnp.zeros((), jnp.float32), {})
    return (y, vary(jnp.asarray(l, jnp.float32))), e

  def losses(sh, y, batch):  # (loss sum, (tokens, other sums))
    total, n, *e = loss_fn(sh, y, batch)
    return total, (n, e[0] if e else {})

  stage = split_vjp(run_stage, p0, x0, batch0, v0)
  sums = _sums_of(jax.eval_shape(run_stage, p0, x0, batch0, v0)[1],
                  jax.eval_shape(losses, shared, x0, batch0)[1][1], vary)
  branches = _branches(stage, embed_fn, losses, sums, vary, zeros(h), zeros(stage.residuals), zeros(p0),
                       zeros(shared))
  fwd_perm, bwd_perm = [(s, (s + 1) % S) for s in range(S)], [(s, (s - 1) % S) for s in range(S)]

  def tick(carry, row):
    (acts, cots, res), fwd_in, bwd_in, (g_p, g_s, loss, tokens, extra) = carry
    acts, cots = _store(acts, row[_RECV], fwd_in), _store(cots, row[_GRECV], bwd_in)
    c = row[_CHUNK]
    p = jax.tree.map(lambda w: w[c], params)
    batch = jax.tree.map(lambda b: b[row[_MICRO]], batches)
    v = vary(c * S + lax.axis_index(axis))  # the virtual stage
    y, dx, dy, new_res, dp, dsh, l, n, e = lax.switch(
        row[_CODE], branches, p, shared, batch, acts[row[_SLOT]], cots[row[_GSLOT]], [r[row[_RSLOT]] for r in res], v)
    cots = _store(cots, row[_GWRITE], dy)
    res = [_store(r, row[_RWRITE], x) for r, x in zip(res, new_res)]
    g_p = jax.tree.map(lambda acc, d: acc.at[c].add(d.astype(acc.dtype)), g_p, dp)
    g_s = jax.tree.map(lambda acc, d: acc + d.astype(acc.dtype), g_s, dsh)
    acc = (g_p, g_s, loss + l, tokens + n, jax.tree.map(jnp.add, extra, e))
    return ((acts, cots, res), lax.ppermute(y, axis, fwd_perm), lax.ppermute(dx, axis, bwd_perm), acc), None

  f32 = lambda tree: zeros(jax.tree.map(lambda w: jax.ShapeDtypeStruct(w.shape, jnp.float32), tree))  # noqa: E731
  bufs = (zeros(_rows(schedule.act_slots, h)), zeros(_rows(schedule.grad_slots, h)),
          [zeros(_rows(schedule.res_slots, r)) for r in stage.residuals])
  acc = (f32(params), f32(shared), f32(jax.ShapeDtypeStruct((), jnp.float32)),
         f32(jax.ShapeDtypeStruct((), jnp.float32)), sums())
  (_, _, _, (g_p, g_s, loss, tokens, extra)), _ = lax.scan(tick, (bufs, zeros(h), zeros(h), acc), rows[0])
  g_p = jax.tree.map(lambda g: g[:, None], _psum_except(g_p, batch_axes, stage_sharded))
  g_s = _psum_except(g_s, manual, shared_sharded)
  return lax.psum(loss, manual), lax.psum(tokens, manual), lax.psum(extra, manual), g_p, g_s


def _rows(n: int, aval) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((n, *aval.shape), aval.dtype)


def _store(buf, slot, msg):
  """buf with row `slot` set to msg; unchanged for slot -1."""
  row = jnp.maximum(slot, 0)
  return buf.at[row].set(jnp.where(slot >= 0, msg, buf[row]))


def _sums_of(stage_e, loss_e, vary) -> Callable:
  """`sums(*dicts)`: the other sums as one float32, varying dict with every key of the stage's and the loss's."""
  keys = {**stage_e, **loss_e}

  def sums(*parts):
    out = {k: jnp.zeros(e.shape, jnp.float32) for k, e in keys.items()}
    for part in parts:
      for k, e in part.items():
        out[k] = out[k] + e.astype(jnp.float32)
    return vary(out)
  return sums


def _branches(stage: SplitVJP, embed_fn, losses, sums, vary, zero_h, zero_r, zero_p, zero_s) -> list[Callable]:
  """The switch branches (idle, forward x (first, last), backward x first), all returning (output to the next
  device, cotangent to the previous one, the loss's cotangent kept here, residuals to keep, stage gradients,
  shared gradients, loss sum, tokens, other sums)."""
  zero_f = vary(jnp.zeros((), jnp.float32))

  def forward(first, last, p, sh, batch, x, g, r, v):
    del g, r
    (y, l), e, res = stage.forward(p, embed_fn(sh, batch) if first else x, batch, v)
    res = vary(res)
    if not last:
      return vary(y), zero_h, zero_h, res, zero_p, zero_s, l, zero_f, sums(e)
    total, head_vjp, (n, e_last) = jax.vjp(lambda sh, y: losses(sh, y, batch), sh, y, has_aux=True)
    dsh, dy = head_vjp(jnp.ones_like(total))  # final norm, head and loss: forward and backward back to back
    return (zero_h, zero_h, vary(dy.astype(zero_h.dtype)), res, zero_p, vary(dsh), vary(total + l),
            vary(jnp.asarray(n, jnp.float32)), sums(e, e_last))

  def backward(first, p, sh, batch, x, g, r, v):
    del x
    dp, dx, _, _ = stage.backward(r, (g, vary(jnp.ones((), jnp.float32))), p, None, batch, v)
    if not first:
      return zero_h, vary(dx.astype(zero_h.dtype)), zero_h, zero_r, vary(dp), zero_s, zero_f, zero_f, sums()
    dsh, = jax.vjp(lambda sh: embed_fn(sh, batch), sh)[1](dx)  # the lookup redone: its gradient is a scatter-add
    return zero_h, zero_h, zero_h, zero_r, vary(dp), vary(dsh), zero_f, zero_f, sums()

  def idle(p, sh, batch, x, g, r, v):
    del p, sh, batch, x, g, r, v
    return zero_h, zero_h, zero_h, zero_r, zero_p, zero_s, zero_f, zero_f, sums()

  return ([idle] + [functools.partial(forward, first, last) for first in (False, True) for last in (False, True)]
          + [functools.partial(backward, first) for first in (False, True)])
