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
input / cotangent buffers (the schedule's slots), runs one branch of a `lax.switch` (idle, forward, or
backward: the stage recomputed from its stored input under `jax.vjp`), and sends the forward output to the next
device and the input cotangent to the previous one with `lax.ppermute`. Only the chosen branch runs, so a
device spends one forward or one backward per tick. Stage inputs are kept, not activations: the backward
recomputes its stage (full rematerialisation at stage granularity), so memory is the schedule's slot count
times one stage input, plus one stage's activations.

Gradients of the shared parameters (embedding, head; tied or not) are summed over the stages with one psum;
the loss and the gradients are divided by the total token count at the end, so they equal `jax.value_and_grad`
of sum(loss sums) / sum(token counts). `stage_axis` and `batch_axes` are manual (`expert` among them for expert
parallelism inside the stages: leaves sharded over it by `stage_specs` / `shared_specs`); the other mesh axes
(tensor) stay automatic, so the stage functions may carry their own sharding constraints for them. A stage
function may use collectives over the batch axes: the devices of one stage take the same branch at every tick.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from jpllm_jax.parallel.pipeline_schedule import BACKWARD, FORWARD, Schedule

# Device row columns: branch index, micro-batch, chunk, input slot, cotangent slot, receive slots.
_CODE, _MICRO, _CHUNK, _SLOT, _GSLOT, _RECV, _GRECV = range(7)


def device_rows(schedule: Schedule) -> np.ndarray:
  """int32 [S, T, 7]: per device and tick the switch branch (0 idle, 1 + 2 first + last forward, 5 + ...
  backward), the micro-batch, the chunk, the read slots (clipped to 0) and the receive slots (-1: none)."""
  act = schedule.field("action")
  code = np.where(act == FORWARD, 1, np.where(act == BACKWARD, 5, 0))
  code = code + (act != 0) * (2 * schedule.is_first() + schedule.is_last())
  cols = [code, schedule.field("micro"), schedule.field("chunk"), np.maximum(schedule.field("slot"), 0),
          np.maximum(schedule.field("grad_slot"), 0), schedule.field("recv_slot"), schedule.field("recv_grad_slot")]
  return np.stack(cols, -1).transpose(1, 0, 2).astype(np.int32)


def pipeline_value_and_grad(stage_fn: Callable, embed_fn: Callable, loss_fn: Callable, stage_params: Any,
                            shared_params: Any, microbatches: Any, *, mesh: Mesh, schedule: Schedule,
                            stage_axis: str = "stage", batch_axes: tuple[str, ...] = (), stage_specs: Any = None,
                            shared_specs: Any = None) -> tuple[jax.Array, dict, tuple[Any, Any]]:
  """Loss, aux and gradients (stage_params', shared_params') of the pipelined model over all micro-batches.

  Args:
    stage_fn, embed_fn, loss_fn: the model's pieces (module docstring).
    stage_params: pytree of [L, ...] stacked layers (L may differ between leaves: several stacks). shared_params: pytree used by embed_fn and loss_fn.
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
  params = _vary(jax.tree.map(lambda w: w[:, 0], params), manual)  # [V, layers per chunk, ...]
  # Varying copies: their gradients stay per device (no implicit psum inside a branch); summed once below.
  shared, batches = _vary(shared, manual), _vary(batches, manual)
  batch0 = jax.tree.map(lambda b: b[0], batches)
  h = jax.eval_shape(embed_fn, shared, batch0)
  zeros = lambda shape, dtype: _vary(jnp.zeros(shape, dtype), manual)  # noqa: E731
  zero_h = zeros(h.shape, h.dtype)
  zero_p = jax.tree.map(lambda w: zeros(w.shape[1:], w.dtype), params)
  zero_s = jax.tree.map(lambda w: zeros(w.shape, w.dtype), shared)
  zero_f = zeros((), jnp.float32)
  v0 = _vary(jnp.zeros((), jnp.int32), manual)

  def run_stage(p, x, batch, v):  # (y, loss term, other sums) whatever stage_fn returns
    out = stage_fn(p, x, batch, v)
    return out if isinstance(out, tuple) else (out, jnp.zeros((), jnp.float32), {})

  def losses(sh, y, batch):  # (loss sum, tokens, other sums)
    return (tuple(loss_fn(sh, y, batch)) + ({},))[:3]

  stage_e = jax.eval_shape(run_stage, zero_p, zero_h, batch0, v0)[2]
  loss_e = jax.eval_shape(losses, shared, zero_h, batch0)[2]
  zero_e = jax.tree.map(lambda e: zeros(e.shape, jnp.float32), {**stage_e, **loss_e})

  def sums(*parts):  # the other sums as one float32, varying dict with every key
    out = dict(zero_e)
    for part in parts:
      for k, e in part.items():
        out[k] = out[k] + e.astype(jnp.float32)
    return _vary(out, manual)

  f32v = lambda x: _vary(jnp.asarray(x, jnp.float32), manual)  # noqa: E731

  def forward(first, last, p, sh, batch, x, g, v):
    del g
    y, l, e = run_stage(p, embed_fn(sh, batch) if first else x, batch, v)
    if not last:
      return y, zero_h, zero_p, zero_s, f32v(l), zero_f, sums(e)
    total, n, e_last = losses(sh, y, batch)
    return zero_h, zero_h, zero_p, zero_s, f32v(total + l), f32v(n), sums(e, e_last)

  def backward(first, last, p, sh, batch, x, g, v):
    def f(p, sh, x):
      y, l, _ = run_stage(p, embed_fn(sh, batch) if first else x, batch, v)
      return losses(sh, y, batch)[0] + l if last else (y, l)
    out, vjp = jax.vjp(f, p, sh, x)
    dp, dsh, dx = vjp(jnp.ones_like(out) if last else (g.astype(out[0].dtype), jnp.ones_like(out[1])))
    return zero_h, zero_h if first else dx.astype(h.dtype), dp, _vary(dsh, manual), zero_f, zero_f, zero_e

  def idle(p, sh, batch, x, g, v):
    del p, sh, batch, x, g, v
    return zero_h, zero_h, zero_p, zero_s, zero_f, zero_f, zero_e

  branches = [idle] + [functools.partial(fn, first, last) for fn in (forward, backward)
                       for first in (False, True) for last in (False, True)]
  fwd_perm = [(s, (s + 1) % S) for s in range(S)]
  bwd_perm = [(s, (s - 1) % S) for s in range(S)]

  def store(buf, slot, msg):
    row = jnp.maximum(slot, 0)
    return buf.at[row].set(jnp.where(slot >= 0, msg, buf[row]))

  def tick(carry, row):
    acts, cots, fwd_in, bwd_in, g_p, g_s, loss, tokens, extra = carry
    acts, cots = store(acts, row[_RECV], fwd_in), store(cots, row[_GRECV], bwd_in)
    c = row[_CHUNK]
    p = jax.tree.map(lambda w: w[c], params)
    batch = jax.tree.map(lambda b: b[row[_MICRO]], batches)
    v = c * S + lax.axis_index(axis)  # the virtual stage
    y, dx, dp, dsh, l, n, e = lax.switch(row[_CODE], branches, p, shared, batch, acts[row[_SLOT]], cots[row[_GSLOT]],
                                         v)
    g_p = jax.tree.map(lambda acc, d: acc.at[c].add(d.astype(acc.dtype)), g_p, dp)
    g_s = jax.tree.map(lambda acc, d: acc + d.astype(acc.dtype), g_s, dsh)
    fwd_in, bwd_in = lax.ppermute(y, axis, fwd_perm), lax.ppermute(dx, axis, bwd_perm)
    extra = jax.tree.map(jnp.add, extra, e)
    return (acts, cots, fwd_in, bwd_in, g_p, g_s, loss + l, tokens + n, extra), None

  f32 = lambda w: zeros(w.shape, jnp.float32)  # noqa: E731
  init = (zeros((schedule.act_slots, *h.shape), h.dtype), zeros((schedule.grad_slots, *h.shape), h.dtype),
          zero_h, zero_h, jax.tree.map(f32, params), jax.tree.map(f32, shared), zero_f, zero_f, zero_e)
  (_, _, _, _, g_p, g_s, loss, tokens, extra), _ = lax.scan(tick, init, rows[0])
  g_p = jax.tree.map(lambda g: g[:, None], _psum_except(g_p, batch_axes, stage_sharded))
  g_s = _psum_except(g_s, manual, shared_sharded)
  return lax.psum(loss, manual), lax.psum(tokens, manual), lax.psum(extra, manual), g_p, g_s
