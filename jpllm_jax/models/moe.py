"""Mixture-of-experts feed-forward layers: routers, routed and shared experts, balance statistics.

Two routers (`MoEConfig.router`):
  softmax  Mixtral: probabilities softmax(x W_r) over E experts, top-k, gates renormalised over the selected.
  sigmoid  DeepSeek-V3 (arXiv:2412.19437, section 2.1.2): affinities s = sigmoid(x W_r); experts are selected
           by s + b, with b a per-expert bias (`router.bias`) that is *not* trained by the optimizer but moved
           by `update_router_bias` towards balance (auxiliary-loss-free balancing); with n_group > 1 only the
           topk_group groups with the largest sum of their top-2 biased scores are eligible (as in transformers'
           DeepseekV3TopkRouter). Gates are the selected *unbiased* s, normalised over the selected
           (norm_topk_prob), times routed_scaling_factor.

Parameters of a MoE layer (stacked on a leading `layers` axis):
  router.kernel [D, E], router.bias [E] (sigmoid router only; both stored in float32 whatever the param_dtype,
  as transformers keeps them: a bf16 bias could not take gamma = 1e-3 steps); the router computes in float32;
  experts.gate / experts.up [E, D, F], experts.down [E, F, D], shared.{gate,up,down}.kernel (n_shared_experts).

The routed experts are computed by the injected `strategy.current().expert_ffn` (expert parallelism, built by
`jpllm_jax.parallel` for meshes with an `expert` axis), by default by grouped matmuls on one device
(`jpllm_jax.moe.moe_ffn`). The model never reads the mesh.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from flax import traverse_util

from jpllm_jax.models import layers, stacks, strategy
from jpllm_jax.models.config import ModelConfig
from jpllm_jax.models.layers import ParamSpec
from jpllm_jax.moe.ops import moe_ffn

ROUTER_BIAS = ("router", "bias")  # the last keys of every non-trainable router bias in the params.


def param_specs(cfg: ModelConfig, n: int) -> dict[str, Any]:
  """The feed-forward weights of `n` stacked MoE layers."""
  D, E, F = cfg.d_model, cfg.moe.n_experts, cfg.expert_d_ff
  router_dtype = "float32" if cfg.moe.router == "sigmoid" else None
  specs: dict[str, Any] = {
      "router": {"kernel": ParamSpec((n, D, E), ("layers", "embed", None), "normal", router_dtype)},
      "experts": {"gate": ParamSpec((n, E, D, F), ("layers", "expert", "embed", "mlp"), "normal"),
                  "up": ParamSpec((n, E, D, F), ("layers", "expert", "embed", "mlp"), "normal"),
                  "down": ParamSpec((n, E, F, D), ("layers", "expert", "mlp", "embed"), "out")},
  }
  if cfg.moe.router == "sigmoid":
    specs["router"]["bias"] = ParamSpec((n, E), ("layers", None), "zeros", "float32")
  if cfg.moe.n_shared_experts:
    Fs = cfg.moe.n_shared_experts * F
    specs["shared"] = {"gate": {"kernel": ParamSpec((n, D, Fs), ("layers", "embed", "mlp"), "normal")},
                       "up": {"kernel": ParamSpec((n, D, Fs), ("layers", "embed", "mlp"), "normal")},
                       "down": {"kernel": ParamSpec((n, Fs, D), ("layers", "mlp", "embed"), "out")}}
  return specs


# --------------------------------------------------------------------------------------------- routing
def route(cfg: ModelConfig, p: dict, x_ND):
  """(expert_ids [N, k] int32, gates [N, k] float32, logits [N, E], probs [N, E]) for tokens `x_ND`.

  `probs` are the softmax probabilities or the sigmoid affinities, the inputs of the balance losses.
  """
  k = cfg.moe.n_experts_per_tok
  logits = layers.matmul("nd,de->ne", x_ND.astype(jnp.float32), p["kernel"].astype(jnp.float32), name="router",
                         preferred_element_type=jnp.float32)
  if cfg.moe.router == "softmax":
    probs = jax.nn.softmax(logits, axis=-1)
    gates, ids = jax.lax.top_k(probs, k)
    if cfg.moe.norm_topk_prob:
      gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return ids, gates * cfg.moe.routed_scaling_factor, logits, probs
  scores = jax.nn.sigmoid(logits)
  choice = scores + jax.lax.stop_gradient(p["bias"].astype(jnp.float32)) if "bias" in p else scores
  if cfg.moe.n_group > 1:
    n, e = choice.shape
    group_scores = jnp.sum(jax.lax.top_k(choice.reshape(n, cfg.moe.n_group, e // cfg.moe.n_group), 2)[0], axis=-1)
    _, groups = jax.lax.top_k(group_scores, cfg.moe.topk_group)
    keep = jnp.sum(jax.nn.one_hot(groups, cfg.moe.n_group, dtype=jnp.int32), axis=1) > 0  # [N, n_group]
    choice = jnp.where(jnp.repeat(keep, e // cfg.moe.n_group, axis=1), choice, -jnp.inf)
  _, ids = jax.lax.top_k(choice, k)
  gates = jnp.take_along_axis(scores, ids, axis=-1)
  if cfg.moe.norm_topk_prob:
    gates = gates / (jnp.sum(gates, axis=-1, keepdims=True) + 1e-20)
  return ids, gates * cfg.moe.routed_scaling_factor, logits, scores


def _routed_experts(x_ND, expert_ids_NK, gates_NK, p: dict, cfg: ModelConfig):
  """sum_k gate_k * SwiGLU_{expert_k}(x) [N, D] and the dispatch statistics ("load" [E], "dropped" []), by the
  injected strategy's expert FFN (default: `moe_ffn`; capacity dropping when `capacity_factor` is set)."""
  expert_ffn = strategy.current().expert_ffn or moe_ffn
  return expert_ffn(x_ND, expert_ids_NK, gates_NK, p["gate"], p["up"], p["down"],
                    capacity_factor=cfg.moe.capacity_factor, activation=cfg.activation)


def ffn(cfg: ModelConfig, p: dict, h_BTD, token_weights_BT=None, with_stats: bool = False):
  """The MoE feed-forward output [B, T, D] of the normed input, and (with_stats) this layer's statistics:
  {"balance_loss", "z_loss": scalars, "expert_load": [E]}, counting tokens with weight 1 (not padding)."""
  b, t, d = h_BTD.shape
  x = h_BTD.reshape(b * t, d)
  ids, gates, logits, probs = route(cfg, p["router"], x)
  y, dispatch = _routed_experts(x, ids, gates, p["experts"], cfg)
  y = y.astype(h_BTD.dtype)
  if "shared" in p:  # DeepSeekMoE's shared experts: one dense SwiGLU that every token passes through.
    s = p["shared"]
    gate = layers.activation(cfg.activation, layers.dense(x, s["gate"], "nd,df->nf", "shared"))
    y = y + layers.dense(gate * layers.dense(x, s["up"], "nd,df->nf", "shared"), s["down"], "nf,fd->nd", "shared")
  y = y.reshape(b, t, d)
  if not with_stats:
    return y, None
  if token_weights_BT is None:
    token_weights_BT = jnp.ones((b, t), jnp.float32)
  stats = _stats(cfg, ids.reshape(b, t, -1), logits.reshape(b, t, -1), probs.reshape(b, t, -1),
                 token_weights_BT.astype(jnp.float32))
  return y, {**stats, "dropped": dispatch["dropped"]}


# ------------------------------------------------------------------------------------------ balancing
def _stats(cfg: ModelConfig, ids_BTK, logits_BTE, probs_BTE, w_BT):
  """Means over the batch, each a ratio of sums; the sums are over all devices that split the batch
  (`strategy.token_sum`), so a batch split over the devices of a pipeline stage gives the one-device values."""
  e, k = cfg.moe.n_experts, cfg.moe.n_experts_per_tok
  total = strategy.token_sum
  counts = jnp.sum(jax.nn.one_hot(ids_BTK, e, dtype=jnp.float32), axis=2) * w_BT[..., None]  # [B, T, E]
  n_tokens = jnp.maximum(total(jnp.sum(w_BT)), 1.0)
  load = total(jnp.sum(counts, axis=(0, 1))) / (k * n_tokens)  # fraction of the assignments per expert; sums to 1.
  z_loss = total(jnp.sum(jax.nn.logsumexp(logits_BTE, axis=-1) ** 2 * w_BT)) / n_tokens  # ST-MoE eq. 5.
  if cfg.moe.router == "softmax":
    # Switch Transformer eq. 4 with top-k: E * sum_e f_e P_e (1 when perfectly balanced).
    mean_probs = total(jnp.sum(probs_BTE * w_BT[..., None], axis=(0, 1))) / n_tokens
    balance = e * jnp.sum(load * mean_probs)
  else:
    # DeepSeek-V3 eq. 17-20, per sequence (batch row): f_i = E / (k T) * count_i, P_i = mean_t s'_i with s'
    # the affinities normalised over all experts; sum_i f_i P_i averaged over the non-empty rows.
    row_tokens = jnp.sum(w_BT, axis=1)  # [B]
    f = e / k * jnp.sum(counts, axis=1) / jnp.maximum(row_tokens, 1.0)[:, None]
    s_norm = probs_BTE / jnp.sum(probs_BTE, axis=-1, keepdims=True)
    p_mean = jnp.sum(s_norm * w_BT[..., None], axis=1) / jnp.maximum(row_tokens, 1.0)[:, None]
    rows = (row_tokens > 0).astype(jnp.float32)
    balance = total(jnp.sum(jnp.sum(f * p_mean, axis=-1) * rows)) / jnp.maximum(total(jnp.sum(rows)), 1.0)
  return {"balance_loss": balance, "z_loss": z_loss, "expert_load": load}


def update_router_bias(bias, load, gamma: float):
  """DeepSeek-V3's auxiliary-loss-free balancing step: b + gamma * sign(mean(load) - load) per layer.

  `bias` and `load` are [..., E] (e.g. params["layers_moe"]["router"]["bias"] [L, E] and the "expert_load"
  [L, E] that `forward(..., return_aux=True)` returns): overloaded experts are pushed down, idle ones up.
  """
  load = jnp.asarray(load, jnp.float32)
  step = gamma * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
  return (bias.astype(jnp.float32) + step).astype(bias.dtype)


# The params' stacks that may hold routed layers (models/stacks.py), in "expert_load" order; which of them do is
# read off the params (a router kernel), so these updates need no config.
ROUTED_STACKS = tuple(path for name, path in stacks.PATHS if name != "layers")


def update_router_biases(params, load, gamma: float):
  """`params` (not modified) with each routed stack's router bias moved by `update_router_bias` from its rows of
  `load` [n_routed_layers, E] (the MoE layers, then the multi-token-prediction blocks); the softmax router has
  no bias to move."""
  flat = traverse_util.flatten_dict(params)
  row = 0
  for stack in ROUTED_STACKS:
    kernel = flat.get((*stack, "router", "kernel"))
    if kernel is None:
      continue
    n = kernel.shape[0]
    if (*stack, *ROUTER_BIAS) in flat:
      flat[(*stack, *ROUTER_BIAS)] = update_router_bias(flat[(*stack, *ROUTER_BIAS)], load[row:row + n], gamma)
    row += n
  return traverse_util.unflatten_dict(flat)


def router_biases(params) -> list:
  """The router biases of the routed stacks, in "expert_load" order."""
  flat = traverse_util.flatten_dict(params)
  return [flat[(*stack, *ROUTER_BIAS)] for stack in ROUTED_STACKS if (*stack, *ROUTER_BIAS) in flat]


def is_router_bias(path) -> bool:
  """Whether a `jax.tree_util` key path names a router bias (kept out of the optimizer)."""
  keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
  return keys[-2:] == ROUTER_BIAS


def trainable_mask(params) -> Any:
  """A pytree of bools like `params`: False for the router biases that `update_router_bias` owns, True
  elsewhere (for `optax.masked` or to zero their updates)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: not is_router_bias(path), params)
