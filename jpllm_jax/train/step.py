"""The train state and the sharded train step: micro-batch accumulation, clipping, and the NaN/spike guard.

The state is a plain dict (params, opt_state, step, rng, loss_ema) so orbax saves it as it is. Parameters
are fp32 master weights; the forward pass runs in `ModelConfig.dtype` (bf16 on accelerators).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jpllm_jax import models
from jpllm_jax.models.config import ModelConfig
from jpllm_jax.parallel import DEFAULT_RULES, axis_rules, logical_to_spec, shardings
from jpllm_jax.parallel.logical import Rules

State = dict[str, Any]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  z_loss: float = 1e-4  # LLM-jp.
  micro_batches: int = 1  # gradient accumulation: the global batch is split into this many parts.
  spike_factor: float = 0.0  # > 0: skip a step whose loss exceeds spike_factor x the running mean.
  ema_decay: float = 0.99
  loss_chunk: int = 512  # tokens per chunk of the fused output head + loss; 0: materialise the logits.


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array, params=None) -> State:
  rng, init_rng = jax.random.split(rng)
  if params is None:
    params = models.init(cfg, init_rng)
  params = jax.tree.map(lambda p: jnp.asarray(p, cfg.param_dtype), params)
  # The RNG is kept as raw key data (uint32) so that checkpoints hold plain arrays.
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
          "rng": jax.random.key_data(rng), "loss_ema": jnp.zeros((), jnp.float32)}


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: Rules = DEFAULT_RULES) -> State:
  """Shardings of every state leaf: optimizer moments follow their parameter, scalars are replicated."""
  param_axes = models.param_axes(cfg)
  abstract = jax.eval_shape(functools.partial(init_state, cfg, tx), jax.random.key(0))
  replicated = NamedSharding(mesh, PartitionSpec())
  is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)
  opt_axes = optax.tree_map_params(tx, lambda _, axes: axes, abstract["opt_state"], param_axes,
                                   transform_non_params=lambda _: (), is_leaf=is_axes)
  opt_shardings = jax.tree.map(
      lambda axes: NamedSharding(mesh, logical_to_spec(axes, rules)) if axes else replicated, opt_axes,
      is_leaf=is_axes)
  return {"params": shardings(param_axes, mesh, rules), "opt_state": opt_shardings, "step": replicated,
          "rng": replicated, "loss_ema": replicated}


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(("batch", "length"), rules))


def _loss_sums(cfg: ModelConfig, params, batch, z_loss: float, loss_chunk: int):
  """Summed (not averaged) cross-entropy and z-loss over a batch, so micro-batches add up exactly.
  `loss_chunk` > 0: tokens per chunk of the fused head + loss (`models.fused_cross_entropy`); 0: logits."""
  kwargs = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
  if loss_chunk:
    x = models.hidden(cfg, params, batch["inputs"], **kwargs)
    w, layout = models.head(cfg, params, x.dtype)
    total, m = models.fused_cross_entropy(x, w, layout, batch["targets"], batch["weights"], z_loss=z_loss,
                                          chunk_tokens=loss_chunk)
  else:
    logits = models.forward(cfg, params, batch["inputs"], **kwargs)
    total, m = models.cross_entropy(logits, batch["targets"], batch["weights"], z_loss=z_loss)
  n = m["tokens"]
  return total * n, (m["ce"] * n, m["z_loss"] * n, n)


def loss_and_grads(cfg: ModelConfig, params, batch, *, z_loss: float, micro_batches: int,
                   loss_chunk: int = 512):
  """Token-weighted mean loss and its gradients, accumulated over `micro_batches` in a scan."""
  grad_fn = jax.value_and_grad(functools.partial(_loss_sums, cfg, z_loss=z_loss, loss_chunk=loss_chunk),
                               has_aux=True)
  if micro_batches == 1:
    (_, (ce, zl, n)), grads = grad_fn(params, batch)
  else:
    split = jax.tree.map(lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:]), batch)

    def body(acc, mb):
      (_, sums), g = grad_fn(params, mb)
      return jax.tree.map(jnp.add, acc, (g, sums)), None

    zeros = (jax.tree.map(jnp.zeros_like, params), (jnp.float32(0), jnp.float32(0), jnp.float32(0)))
    (grads, (ce, zl, n)), _ = jax.lax.scan(body, zeros, split)
  denom = jnp.maximum(n, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  return {"loss": (ce + z_loss * zl) / denom, "ce": ce / denom, "z_loss": zl / denom, "tokens": n}, grads


def train_step(state: State, batch: dict[str, jax.Array], *, cfg: ModelConfig, tx: optax.GradientTransformation,
               schedule: optax.Schedule, step_cfg: StepConfig) -> tuple[State, dict[str, jax.Array]]:
  """One optimiser step. A step whose loss or gradients are not finite, or whose loss spikes, is skipped:
  parameters and optimizer state stay as they were and `skipped` is 1 in the metrics."""
  metrics, grads = loss_and_grads(cfg, state["params"], batch, z_loss=step_cfg.z_loss,
                                  micro_batches=step_cfg.micro_batches, loss_chunk=step_cfg.loss_chunk)
  grad_norm = optax.tree.norm(grads)
  leaf_finite = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
  finite = jnp.isfinite(metrics["loss"]) & jnp.all(leaf_finite)
  ema = state["loss_ema"]
  spike = (step_cfg.spike_factor > 0) & (ema > 0) & (metrics["loss"] > step_cfg.spike_factor * ema)
  bad = ~finite | spike
  updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
  new_params = optax.apply_updates(state["params"], updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(bad, b, a), new, old)
  new_ema = jnp.where(ema > 0, step_cfg.ema_decay * ema + (1 - step_cfg.ema_decay) * metrics["loss"],
                      metrics["loss"])
  # Every optax `count` in the chain is the number of applied updates; the schedule reads it.
  count = optax.tree_utils.tree_get_all_with_path(state["opt_state"], "count")[0][1]
  new_state = {
      "params": keep(new_params, state["params"]),
      "opt_state": keep(new_opt, state["opt_state"]),
      "step": state["step"] + 1,
      "rng": jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])),
      "loss_ema": jnp.where(bad, ema, new_ema),
  }
  metrics.update(grad_norm=grad_norm, lr=schedule(count), skipped=bad.astype(jnp.int32),
                 nonfinite=(~finite).astype(jnp.int32),
                 first_nonfinite_leaf=jnp.where(jnp.all(leaf_finite), -1, jnp.argmin(leaf_finite)))
  return new_state, metrics


def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    step_cfg: StepConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """`train_step` jitted with the state and batch shardings of `mesh`; the state buffers are donated."""
  state_sh = state_shardings(cfg, tx, mesh, rules)
  batch_sh = {k: batch_sharding(mesh, rules) for k in BATCH_KEYS}

  def step(state, batch):
    with axis_rules(mesh, rules):
      return train_step(state, batch, cfg=cfg, tx=tx, schedule=schedule, step_cfg=step_cfg)

  return jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)


def make_eval_step(cfg: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES, loss_chunk: int = 512):
  """Jitted summed validation loss of a batch: returns (ce_sum, tokens)."""
  def evaluate(params, batch):
    with axis_rules(mesh, rules):
      _, (ce, _, n) = _loss_sums(cfg, params, batch, 0.0, loss_chunk)
    return ce, n

  return jax.jit(evaluate)


def nonfinite_leaf_name(cfg: ModelConfig, index: int) -> str:
  """The parameter path of gradient leaf `index` (for the guard's error message)."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(models.param_shapes(cfg))]
  return paths[index] if 0 <= index < len(paths) else "?"
