"""The train state and the sharded train step: micro-batch accumulation, clipping, and the NaN/spike guard.

The state is a plain dict (params, opt_state, step, loss_ema, and with `matmul='fp8_delayed'` the FP8 amax
histories "fp8", models/fp8.py) so orbax saves it as it is. Parameters are fp32 master weights; the forward pass
runs in `ModelConfig.dtype` (bf16 on accelerators).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jpllm_jax import models
from jpllm_jax.models import fp8, layers, moe, stacks
from jpllm_jax.models.stacks import Stack
from jpllm_jax.models import strategy as model_strategy
from jpllm_jax.models.config import ModelConfig
from jpllm_jax.moe.ops import moe_ffn
from jpllm_jax.parallel import DEFAULT_RULES, axis_rules, logical_to_spec, shardings
from jpllm_jax.parallel.expert import moe_ffn_expert_local
from jpllm_jax.parallel.logical import Rules, current_rules, logical_constraint
from jpllm_jax.parallel.pipeline import pipeline_value_and_grad
from jpllm_jax.parallel.pipeline_schedule import Schedule, make_schedule

State = dict[str, Any]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")
LOSS_CHUNK = 512  # tokens per chunk of the fused output head + loss (bounds the [chunk, vocab] logits).


@dataclasses.dataclass(frozen=True)
class StepConfig:
  z_loss: float = 1e-4  # LLM-jp.
  micro_batches: int = 1  # gradient accumulation, or the pipeline's micro-batches: the batch is split this many ways.
  pipeline: str = ""  # with a `stage` mesh axis > 1: gpipe, 1f1b or interleaved ("": 1f1b).
  virtual_stages: int = 1  # interleaved: model chunks per device (Megatron's virtual pipeline stages).
  spike_factor: float = 0.0  # > 0: skip a step whose loss exceeds spike_factor x the running mean.
  ema_decay: float = 0.99
  loss_chunk: int = LOSS_CHUNK  # 0: materialise the logits.
  # Mixture of experts and multi-token prediction (DeepSeek-V3's values; no effect on dense models).
  mtp_loss_coef: float = 0.3  # lambda: the MTP loss is lambda * the mean over depths of their cross-entropy.
  router_bias_rate: float = 0.001  # gamma of the auxiliary-loss-free balancing; 0 freezes the router biases.


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array, params=None) -> State:
  """Parameters (from `rng`, or `params` cast to the master dtype), optimizer state, step and loss EMA, and for
  fp8_delayed the (empty) amax histories, outside the params: the optimizer never sees them."""
  if params is None:
    params = models.init(cfg, rng)
  params = jax.tree.map(lambda p: jnp.asarray(p, cfg.numerics.param_dtype), params)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "loss_ema": jnp.zeros((), jnp.float32)}
  history = fp8.init_history(cfg, params, models.param_axes(cfg))
  return state if history is None else {**state, "fp8": history}


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: Rules = DEFAULT_RULES) -> State:
  """Shardings of every state leaf: optimizer moments follow their parameter; scalars and the FP8 amax histories
  (a few floats per projection) are replicated."""
  param_axes = _stage_divisible_axes(cfg, mesh, models.param_axes(cfg))
  abstract = jax.eval_shape(functools.partial(init_state, cfg, tx), jax.random.key(0))
  replicated = NamedSharding(mesh, PartitionSpec())
  is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)
  opt_axes = optax.tree_map_params(tx, lambda _, axes: axes, abstract["opt_state"], param_axes,
                                   transform_non_params=lambda _: (), is_leaf=is_axes)
  opt_shardings = jax.tree.map(
      lambda axes: NamedSharding(mesh, logical_to_spec(axes, rules)) if axes else replicated, opt_axes,
      is_leaf=is_axes)
  out = {"params": shardings(param_axes, mesh, rules), "opt_state": opt_shardings, "step": replicated,
         "loss_ema": replicated}
  return out | ({"fp8": jax.tree.map(lambda _: replicated, abstract["fp8"])} if "fp8" in abstract else {})


def _stage_divisible_axes(cfg: ModelConfig, mesh: Mesh, axes):
  """`axes` with the `layers` axis unsharded (kept whole on every stage) for the stacks whose layer count the
  `stage` axis does not divide (uneven pipelines: DeepSeek's first dense layers, the MTP blocks)."""
  n = mesh.shape.get("stage", 1)
  shapes = models.param_shapes(cfg)
  def fix(a, shape):
    return tuple(None if x == "layers" and shape.shape[i] % n else x for i, x in enumerate(a))
  return jax.tree.map(fix, axes, shapes, is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(("batch", "length"), rules))


def _mtp_targets(batch, k: int):
  """Targets and weights of MTP depth k: position i predicts token i + k + 2 (= targets[i + k + 1]) where it is
  a real next token of the same document as token i."""
  shift = lambda a: jnp.pad(a[:, k + 1:], ((0, 0), (0, k + 1)))
  same_doc = (shift(batch["segment_ids"]) == batch["segment_ids"]).astype(jnp.float32)
  return shift(batch["targets"]), batch["weights"].astype(jnp.float32) * shift(batch["weights"]) * same_doc


def _loss_sums(cfg: ModelConfig, params, batch, z_loss: float, loss_chunk: int, mtp_loss_coef: float = 0.0):
  with fp8.probing(params) as params:  # (params may carry the FP8 statistics probe: models/fp8.py)
    return _model_loss_sums(cfg, params, batch, z_loss, loss_chunk, mtp_loss_coef)


def _model_loss_sums(cfg: ModelConfig, params, batch, z_loss: float, loss_chunk: int, mtp_loss_coef: float = 0.0):
  """Summed (not averaged) loss terms over a batch, so micro-batches add up exactly: (total, sums) with sums
  {"loss" (= total), "ce", "z_loss", "tokens"} and, for MoE / MTP models, "moe_loss", "expert_load" [L_r, E],
  "mtp_loss" (each a per-token mean times the tokens) and "moe_dropped" (assignments dropped by the capacity).
  `loss_chunk` > 0: tokens per chunk of the fused head + loss (`models.fused_cross_entropy`); 0: logits."""
  kwargs = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
  with_aux = bool(cfg.moe.n_experts or cfg.mtp.depth)
  mtp = None
  if loss_chunk:
    out = models.hidden(cfg, params, batch["inputs"], return_aux=with_aux, **kwargs)
    x, aux = out if with_aux else (out, {})
    w, layout = models.head(cfg, params, x.dtype)
    ce_fn = lambda h, targets, weights, zl: models.fused_cross_entropy(h, w, layout, targets, weights, z_loss=zl,
                                                                       chunk_tokens=loss_chunk)
    total, m = ce_fn(x, batch["targets"], batch["weights"], z_loss)
    if "mtp_hidden" in aux:
      # the total (= the mean cross-entropy at z_loss 0), not the metric `ce`, which carries no gradient
      mtp = [ce_fn(h, *_mtp_targets(batch, k), 0.0)[0] for k, h in enumerate(aux["mtp_hidden"])]
  else:
    out = models.forward(cfg, params, batch["inputs"], return_aux=with_aux, **kwargs)
    logits, aux = out if with_aux else (out, {})
    total, m = models.cross_entropy(logits, batch["targets"], batch["weights"], z_loss=z_loss)
    if "mtp_logits" in aux:
      mtp = [models.cross_entropy(lg, *_mtp_targets(batch, k))[1]["ce"] for k, lg in enumerate(aux["mtp_logits"])]
  n = m["tokens"]
  sums = {"ce": m["ce"] * n, "z_loss": m["z_loss"] * n, "tokens": n}
  if "expert_load" in aux:
    sums["moe_loss"] = (aux["moe_aux_loss"] + aux["router_z_loss"]) * n
    sums["expert_load"] = aux["expert_load"] * n
    sums["moe_dropped"] = aux["moe_dropped"].astype(jnp.float32)  # a count: summed, not averaged
    total = total + aux["moe_aux_loss"] + aux["router_z_loss"]
  if mtp is not None:
    mtp_mean = jnp.mean(jnp.stack(mtp))
    sums["mtp_loss"] = mtp_mean * n
    total = total + mtp_loss_coef * mtp_mean
  sums["loss"] = total * n
  return sums["loss"], sums


def loss_and_grads(cfg: ModelConfig, params, batch, *, z_loss: float, micro_batches: int,
                   loss_chunk: int = LOSS_CHUNK, mtp_loss_coef: float = 0.0):
  """Token-weighted mean loss and its gradients, accumulated over `micro_batches` in a scan."""
  grad_fn = jax.value_and_grad(functools.partial(_loss_sums, cfg, z_loss=z_loss, loss_chunk=loss_chunk,
                                                 mtp_loss_coef=mtp_loss_coef), has_aux=True)
  if micro_batches == 1:
    (_, sums), grads = grad_fn(params, batch)
  else:
    split = jax.tree.map(lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:]), batch)

    def body(acc, mb):
      (_, sums), g = grad_fn(params, mb)
      return (fp8.accumulate(acc[0], g), jax.tree.map(jnp.add, acc[1], sums)), None  # (FP8 amaxes: max)

    sums_shape = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], split))[0][1]
    zeros = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
    (grads, sums), _ = jax.lax.scan(body, zeros, split)
  denom = jnp.maximum(sums["tokens"], 1.0)
  grads = fp8.divide(grads, denom)
  means = {k: v if k == "moe_dropped" else v / denom for k, v in sums.items() if k != "tokens"}
  return {**means, "tokens": sums["tokens"]}, grads


def pipeline_schedule(cfg: ModelConfig, mesh: Mesh, step_cfg: StepConfig) -> Schedule | None:
  """The tick table of a mesh with `stage` > 1 (None without one); fails before compiling, naming the fix, for a
  layer count (dense and MoE layers together) that does not split into stages x virtual_stages."""
  S, V = mesh.shape.get("stage", 1), step_cfg.virtual_stages
  if S == 1:
    return None
  if cfg.numerics.matmul != "default":  # the pipeline's stages do not inject the matmul policy yet.
    raise ValueError(f"pipeline parallelism (mesh.stage > 1) runs model.matmul=default only so far, not "
                     f"{cfg.numerics.matmul!r}; set mesh.stage=1 for FP8 training")
  L, n = cfg.n_layers, S * V
  if L % n:
    stages = [s for s in range(1, L + 1) if L % (s * V) == 0]
    raise ValueError(f"n_layers={L} does not split into mesh.stage x train.virtual_stages = {S} x {V} chunks; use "
                     f"n_layers={L // n * n or n} or {L // n * n + n}, or mesh.stage in {stages}")
  return make_schedule(step_cfg.pipeline or "1f1b", S, step_cfg.micro_batches, V)


def _onehot_ce_sums(logits, b):
  """Weighted sums (cross-entropy, log Z ** 2, tokens) of a micro-batch's logits, the target logit picked by a
  one-hot select rather than a gather: XLA's SPMD partitioner aborts on the gather of vocabulary-sharded logits
  inside the pipeline's partially manual shard_map (spmd_partitioner_util.cc:497 with stage x tensor x another
  axis); the select partitions like the logsumexp. Equal to `models.cross_entropy`'s sums (one non-zero term)."""
  logits = logical_constraint(logits, ("batch", "length", "vocab"))
  log_z = jax.nn.logsumexp(logits, axis=-1)
  onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == b["targets"][..., None]
  target = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
  w = b["weights"].astype(jnp.float32)
  return jnp.sum((log_z - target) * w), jnp.sum(jnp.square(log_z) * w), jnp.sum(w)


def stage_layout(cfg: ModelConfig, stages: int, virtual: int = 1) -> list[tuple[Stack, np.ndarray, np.ndarray]]:
  """The layer -> virtual stage assignment across the main stacks (`models.stacks`): the model's layers in order
  cut into S x V equal chunks, chunk v run by device v % S. Per stack: (stack, index int [S V, w], active bool
  [S V, w]): chunk v runs rows index[v] of that stack where active (w: the most any chunk has; an uneven stack,
  e.g. DeepSeek's first dense layers, is padded with inactive rows). The MTP blocks run with the loss."""
  chunks = stages * virtual
  per = cfg.n_layers // chunks
  out = []
  for stack in stacks.main_stacks(cfg):
    k, start = stack.n, stack.first
    lo = np.clip(np.arange(chunks) * per - start, 0, k)
    count = np.clip(np.arange(1, chunks + 1) * per - start, 0, k) - lo
    width = int(count.max())
    out.append((stack, np.minimum(lo[:, None] + np.arange(width), k - 1), np.arange(width) < count[:, None]))
  return out


def _pipeline_batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The batch's mesh axes that the pipeline makes manual: one pipeline per data-parallel group, and `expert`
  (which splits the batch like `data` outside the MoE layers) for the expert-parallel path inside the stages.
  Under the active rules, else DEFAULT_RULES."""
  state = current_rules()
  axes = logical_to_spec(("batch",), state[1] if state else DEFAULT_RULES)[0] or ()
  axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if mesh.shape[a] > 1)
  if mesh.shape.get("expert", 1) > 1 and "expert" not in axes:
    raise ValueError("a pipeline with mesh.expert > 1 needs the `batch` rule to include `expert` (the expert "
                     f"ranks hold different tokens); the batch maps to {axes}")
  return axes


def _expert_specs(axes_tree, batch_axes: tuple[str, ...], layer_axis: bool):
  """PartitionSpecs that shard the experts' E over the manual `expert` axis inside the pipeline (the other
  dimensions whole; `layer_axis`: the leading layer axis left out), or None without expert parallelism."""
  if "expert" not in batch_axes:
    return None
  spec = lambda axes: PartitionSpec(*("expert" if a == "expert" else None for a in axes[int(layer_axis):]))
  return jax.tree.map(spec, axes_tree, is_leaf=lambda x: isinstance(x, tuple))


def _stage_strategy(batch_axes: tuple[str, ...]):
  """The model's parallel strategy inside the pipeline's shard_map (manual over stage and `batch_axes`): MoE
  statistics summed over the devices that split the micro-batch; with `expert` among them the expert-parallel
  path's per-device body (all_to_all over `expert` inside the stage's branch; a nested shard_map fails Shardy's
  verifier), else `moe_ffn` on the device's tokens; both with the ragged layout (the block layout's
  `jnp.searchsorted` fails on stage-varying inputs in jax 0.10.2)."""
  total = functools.partial(jax.lax.psum, axis_name=batch_axes) if batch_axes else None
  ffn = moe_ffn_expert_local if "expert" in batch_axes else moe_ffn
  return model_strategy.use(model_strategy.Strategy(expert_ffn=functools.partial(ffn, impl="ragged"),
                                                    token_sum=total))


def _moe_sums(cfg: ModelConfig, stats, rows, on, n):
  """A stage's share of the MoE losses as a loss term (its routed layers' balance and router z-losses, each
  a mean over all routed layers times the micro-batch's tokens n, as in `_loss_sums`), and its sums."""
  on = on.astype(jnp.float32)
  n_routed = cfg.n_routed_layers
  term = n * (cfg.moe.moe_aux_loss_coef * jnp.sum(stats["balance_loss"] * on)
              + cfg.moe.router_z_loss_coef * jnp.sum(stats["z_loss"] * on)) / n_routed
  load = jnp.zeros((n_routed, cfg.moe.n_experts), jnp.float32).at[rows].add(stats["expert_load"] * on[:, None])
  return term, {"moe_loss": jax.lax.stop_gradient(term), "expert_load": load * n,
                "moe_dropped": jnp.sum(stats["dropped"].astype(jnp.float32) * on)}


def pipeline_loss_and_grads(cfg: ModelConfig, params, batch, *, mesh: Mesh, schedule: Schedule, z_loss: float,
                            mtp_loss_coef: float = 0.0):
  """`loss_and_grads` pipelined over the `stage` mesh axis: the embedding runs on the first virtual stage, the
  layers of both stacks in the chunks of `stage_layout`, final norm, head, loss and the MTP blocks on the last
  (a tied embedding's gradients from both ends summed by the executor; MoE balance losses where their layers run).
  The batch is split into `schedule.micro_batches` like `loss_and_grads`, whose metrics this returns."""
  M, S, V = schedule.micro_batches, schedule.stages, schedule.virtual
  split = jax.tree.map(lambda x: x.reshape(M, x.shape[0] // M, *x.shape[1:]), batch)
  layout = stage_layout(cfg, S, V)
  names = {stack.name for stack, _, _ in layout}  # the main stacks are top-level entries of the params
  shared = {k: v for k, v in params.items() if k not in names}
  stage_params, plain = {}, {}
  for stack, index, active in layout:  # an even single stack runs as it is stored; others are gathered, padded.
    name, w = stack.name, stacks.get(params, stack)
    plain[name] = active.all() and np.array_equal(index.reshape(-1), np.arange(index.size))
    stage_params[name] = w if plain[name] else jax.tree.map(lambda a: a[index.reshape(-1)], w)
  batch_axes = _pipeline_batch_axes(mesh)
  split_ways = int(np.prod([mesh.shape[a] for a in batch_axes]))
  if (rows := batch["inputs"].shape[0] // M) % split_ways:
    raise ValueError(f"the pipeline's micro-batches of {rows} rows (batch / train.micro_batches) do not split over "
                     f"the {split_ways} devices of mesh axes {batch_axes}; use a batch divisible by {M * split_ways}")
  axes = models.param_axes(cfg)
  specs = (_expert_specs({k: axes[k] for k in stage_params}, batch_axes, True),
           _expert_specs({k: axes[k] for k in shared}, batch_axes, False))

  def embed_fn(sh, b):
    return models.embed(cfg, sh, b["inputs"], b["positions"])

  def stage_fn(p, h, b, v):
    ctx = models.context(cfg, b["inputs"], b["positions"], b["segment_ids"])
    term, extra = jnp.zeros((), jnp.float32), {}
    with _stage_strategy(batch_axes):
      for stack, index, active in layout:
        on = jnp.asarray(active)[v]
        h, stats = models.run_stack(cfg, p[stack.name], h, ctx, with_stats=stack.moe,
                                    active=None if active.all() else on)
        if stack.moe:
          term, extra = _moe_sums(cfg, stats, stack.routed_row + jnp.asarray(index)[v], on,
                                  jnp.sum(b["weights"].astype(jnp.float32)))
    return h, term, extra

  def ce_sums(sh, x, targets, weights):
    w, lay = models.head(cfg, sh, x.dtype)
    logits = jnp.einsum(f"btd,{lay}->btv", x, w, preferred_element_type=jnp.float32)
    return _onehot_ce_sums(logits, {"targets": targets, "weights": weights})

  def loss_fn(sh, h, b):
    ce, zl, n = ce_sums(sh, layers.norm(cfg, sh["final_norm"], h), b["targets"], b["weights"])
    total, extra = ce + z_loss * zl, {"ce": ce, "z_loss": zl}
    if cfg.mtp.depth:
      ctx = models.context(cfg, b["inputs"], b["positions"], b["segment_ids"])
      mtp = []
      with _stage_strategy(batch_axes):
        hid, stats = models.mtp_hidden(cfg, sh, b["inputs"], h, ctx)
        for k in range(cfg.mtp.depth):  # a mean over the whole micro-batch, whose rows the batch axes split
          ce_k, _, n_k = ce_sums(sh, hid[k], *_mtp_targets(b, k))
          mtp.append(model_strategy.token_sum(ce_k) / jnp.maximum(model_strategy.token_sum(n_k), 1.0))
      mtp_mean = jnp.mean(jnp.stack(mtp))
      total, extra["mtp_loss"] = total + mtp_loss_coef * mtp_mean * n, mtp_mean * n
      if stats is not None:
        rows = stacks.by_name(cfg, "mtp").routed_row + jnp.arange(cfg.mtp.depth)
        term, moe_extra = _moe_sums(cfg, stats, rows, jnp.ones((cfg.mtp.depth,), bool), n)
        total, extra = total + term, {**extra, **moe_extra}
    return total, n, extra

  loss, aux, (g_stage, g_shared) = pipeline_value_and_grad(stage_fn, embed_fn, loss_fn, stage_params, shared, split,
                                                           mesh=mesh, schedule=schedule, batch_axes=batch_axes,
                                                           stage_specs=specs[0], shared_specs=specs[1])
  grads = dict(g_shared)
  for stack, index, active in layout:  # back to the stored stacks: padded rows dropped, gathered rows summed.
    name = stack.name
    if plain[name]:
      grads[name] = g_stage[name]
      continue
    keep = active.reshape(-1)
    grads[name] = jax.tree.map(
        lambda g, w: jnp.zeros_like(w).at[index.reshape(-1)].add(
            jnp.where(keep.reshape(-1, *[1] * (g.ndim - 1)), g, 0).astype(w.dtype)), g_stage[name], params[name])
  denom = jnp.maximum(aux["tokens"], 1.0)
  metrics = {k: v if k == "moe_dropped" else v / denom for k, v in aux.items() if k not in ("loss_sum", "tokens")}
  return {**metrics, "loss": loss, "tokens": aux["tokens"]}, {k: grads[k] for k in params}


def train_step(state: State, batch: dict[str, jax.Array], *, cfg: ModelConfig, tx: optax.GradientTransformation,
               schedule: optax.Schedule, step_cfg: StepConfig, mesh: Mesh | None = None,
               pipeline: Schedule | None = None) -> tuple[State, dict[str, jax.Array]]:
  """One optimiser step (pipelined over `mesh`'s `stage` axis with a `pipeline` schedule). A step whose loss or gradients are not finite, or whose loss spikes, is skipped:
  parameters and optimizer state stay as they were and `skipped` is 1 in the metrics.

  MoE models: the router biases get no optimizer update (`optimizer.make_optimizer` freezes them); they move by
  `router_bias_rate` towards balance from this step's expert load (DeepSeek-V3's auxiliary-loss-free balancing).
  """
  history = state.get("fp8")  # (the pipeline runs model.matmul=default only: no histories there)
  if pipeline is not None:
    metrics, grads = pipeline_loss_and_grads(cfg, state["params"], batch, mesh=mesh, schedule=pipeline,
                                             z_loss=step_cfg.z_loss, mtp_loss_coef=step_cfg.mtp_loss_coef)
  else:
    metrics, grads, history = fp8.train_grads(cfg, state["params"], state["step"], lambda params: loss_and_grads(
        cfg, params, batch, z_loss=step_cfg.z_loss, micro_batches=step_cfg.micro_batches,
        loss_chunk=step_cfg.loss_chunk, mtp_loss_coef=step_cfg.mtp_loss_coef), history)
  grad_norm = optax.tree.norm(grads)
  leaf_finite = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
  finite = jnp.isfinite(metrics["loss"]) & jnp.all(leaf_finite)
  ema = state["loss_ema"]
  spike = (step_cfg.spike_factor > 0) & (ema > 0) & (metrics["loss"] > step_cfg.spike_factor * ema)
  bad = ~finite | spike
  updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
  new_params = optax.apply_updates(state["params"], updates)
  if "expert_load" in metrics:
    new_params = moe.update_router_biases(new_params, metrics["expert_load"], step_cfg.router_bias_rate)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(bad, b, a), new, old)
  new_ema = jnp.where(ema > 0, step_cfg.ema_decay * ema + (1 - step_cfg.ema_decay) * metrics["loss"],
                      metrics["loss"])
  # Every optax `count` in the chain is the number of applied updates; the schedule reads it.
  count = optax.tree_utils.tree_get_all_with_path(state["opt_state"], "count")[0][1]
  new_state = {
      "params": keep(new_params, state["params"]),
      "opt_state": keep(new_opt, state["opt_state"]),
      "step": state["step"] + 1,
      "loss_ema": jnp.where(bad, ema, new_ema),
  }
  if history is not None:  # the amax histories move on with every applied step
    new_state["fp8"] = keep(history, state["fp8"])
  metrics.update(grad_norm=grad_norm, lr=schedule(count), skipped=bad.astype(jnp.int32),
                 nonfinite=(~finite).astype(jnp.int32),
                 first_nonfinite_leaf=jnp.where(jnp.all(leaf_finite), -1, jnp.argmin(leaf_finite)))
  if "expert_load" in metrics:
    metrics.update(moe_metrics(cfg, new_state["params"], metrics["expert_load"]))
  return new_state, metrics


def moe_metrics(cfg: ModelConfig, params, load_LE) -> dict[str, jax.Array]:
  """Balance of the experts: the largest and smallest load relative to uniform (1 = balanced) over the routed
  layers and experts, and the norm of all router biases after this step."""
  rel = load_LE * cfg.moe.n_experts
  out = {"moe_load_max": jnp.max(rel), "moe_load_min": jnp.min(rel)}
  if biases := moe.router_biases(params):
    out["router_bias_norm"] = optax.tree.norm(biases)  # (stored in float32)
  return out


def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    step_cfg: StepConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """`train_step` jitted with the state and batch shardings of `mesh`; the state buffers are donated. A mesh with
  `stage` > 1 pipelines the step (`pipeline_schedule`)."""
  pipeline = pipeline_schedule(cfg, mesh, step_cfg)
  state_sh = state_shardings(cfg, tx, mesh, rules)
  batch_sh = {k: batch_sharding(mesh, rules) for k in BATCH_KEYS}

  def step(state, batch):
    with axis_rules(mesh, rules):
      return train_step(state, batch, cfg=cfg, tx=tx, schedule=schedule, step_cfg=step_cfg, mesh=mesh,
                        pipeline=pipeline)

  return jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)


def make_eval_step(cfg: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES, loss_chunk: int = LOSS_CHUNK):
  """Jitted summed validation loss of a batch: returns (ce_sum, tokens)."""
  def evaluate(params, batch):
    with axis_rules(mesh, rules):
      _, sums = _loss_sums(cfg, params, batch, 0.0, loss_chunk)
    return sums["ce"], sums["tokens"]

  return jax.jit(evaluate)


def nonfinite_leaf_name(cfg: ModelConfig, index: int) -> str:
  """The parameter path of gradient leaf `index` (for the guard's error message)."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(models.param_shapes(cfg))]
  return paths[index] if 0 <= index < len(paths) else "?"
