"""Mixture-of-experts, latent attention and multi-token prediction: routing, balance statistics, the latent
KV cache, MTP, presets and logical axes, each against a plain reference."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpllm_jax import models
from jpllm_jax.generate import generate
from jpllm_jax.models import moe
from jpllm_jax.models.config import ModelConfig

from hf_helpers import random_params

_fwd = jax.jit(models.forward, static_argnums=0, static_argnames="return_aux")
step = jax.jit(models.forward_cached, static_argnums=0)
B, T = 2, 12  # one batch shape for the forward passes, so that tests share their compilations.


def fwd(cfg, params, tokens, segment_ids=None, positions=None, return_aux=False):
  """`models.forward` (jitted) with explicit segment ids and positions: one compilation per config and shape."""
  seg = jnp.ones(tokens.shape, jnp.int32) if segment_ids is None else segment_ids
  pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape) if positions is None else positions
  return _fwd(cfg, params, tokens, positions=pos, segment_ids=seg, return_aux=return_aux)

TINY = dict(vocab_size=101, d_model=32, n_heads=4, d_ff=48, max_seq_len=64, init_std=0.3)
MOE_CONFIGS = {
    "mixtral": models.preset("mixtral-8x7b", **TINY, n_layers=2, n_kv_heads=2, router_z_loss_coef=1e-3),
    # One dense layer, then MoE; q latent, YaRN with mscale, interleaved RoPE, 16 experts in 4 groups, top-4.
    "deepseek_v3": models.preset(
        "deepseek-v3", **TINY, n_layers=3, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, moe_d_ff=8, first_k_dense=1, n_experts=16, n_group=4, topk_group=2,
        n_experts_per_tok=4, mtp_depth=0, moe_aux_loss_coef=1e-2,
        rope_scaling=(("factor", 4.0), ("mscale", 1.0), ("mscale_all_dim", 1.0),
                      ("original_max_position_embeddings", 8.0))),
}


@pytest.fixture(params=sorted(MOE_CONFIGS))
def moe_config(request):
  return MOE_CONFIGS[request.param]


def _tokens(cfg, shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size)


# ------------------------------------------------------------------------------------------- routing
def test_softmax_router_is_renormalised_top_k():
  cfg = MOE_CONFIGS["mixtral"]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(10, cfg.d_model)).astype(np.float32)
  w = rng.normal(size=(cfg.d_model, cfg.moe.n_experts)).astype(np.float32)
  ids, gates, _, probs = moe.route(cfg, {"kernel": jnp.asarray(w)}, jnp.asarray(x))
  p = np.exp(x @ w - (x @ w).max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.argsort(-p, axis=-1)[:, :2]
  np.testing.assert_array_equal(np.asarray(ids), want)
  top = np.take_along_axis(p, want, -1)
  np.testing.assert_allclose(np.asarray(gates), top / top.sum(-1, keepdims=True), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(probs), p, rtol=1e-5)


def test_sigmoid_router_limits_groups_and_uses_unbiased_gates():
  cfg = MOE_CONFIGS["deepseek_v3"]
  rng = np.random.default_rng(1)
  n, e, g = 50, cfg.moe.n_experts, cfg.moe.n_group
  x = rng.normal(size=(n, cfg.d_model)).astype(np.float32)
  p = {"kernel": jnp.asarray(rng.normal(size=(cfg.d_model, e)), jnp.float32),
       "bias": jnp.asarray(rng.normal(size=e) * 0.3, jnp.float32)}
  ids, gates, _, scores = map(np.asarray, moe.route(cfg, p, jnp.asarray(x)))
  s = 1 / (1 + np.exp(-(x @ np.asarray(p["kernel"]))))
  choice = s + np.asarray(p["bias"])
  group_score = np.sort(choice.reshape(n, g, -1), axis=-1)[..., -2:].sum(-1)
  groups = np.argsort(-group_score, axis=-1)[:, :cfg.moe.topk_group]
  allowed = np.zeros((n, e), bool)
  for row, gs in enumerate(groups):
    for gi in gs:
      allowed[row, gi * (e // g):(gi + 1) * (e // g)] = True
  want = np.argsort(-np.where(allowed, choice, -np.inf), axis=-1)[:, :cfg.moe.n_experts_per_tok]
  np.testing.assert_array_equal(np.sort(ids, -1), np.sort(want, -1))
  top = np.take_along_axis(s, ids, -1)  # the unbiased affinities of the selected experts.
  np.testing.assert_allclose(gates, top / top.sum(-1, keepdims=True) * cfg.moe.routed_scaling_factor, rtol=1e-5)
  np.testing.assert_allclose(scores, s, rtol=1e-5)


def test_routed_experts_equal_a_per_token_loop():
  cfg = MOE_CONFIGS["deepseek_v3"]
  rng = np.random.default_rng(2)
  n, d, e, f, k = 6, cfg.d_model, cfg.moe.n_experts, cfg.expert_d_ff, cfg.moe.n_experts_per_tok
  x = rng.normal(size=(n, d)).astype(np.float32)
  ids = np.stack([rng.choice(e, k, replace=False) for _ in range(n)])
  gates = rng.random((n, k)).astype(np.float32)
  p = {name: rng.normal(size=shape).astype(np.float32) * 0.3
       for name, shape in (("gate", (e, d, f)), ("up", (e, d, f)), ("down", (e, f, d)))}
  got, stats = moe._routed_experts(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(gates),
                                   jax.tree.map(jnp.asarray, p), cfg)
  assert int(stats["dropped"]) == 0 and np.array_equal(np.asarray(stats["load"]), np.bincount(ids.ravel(), minlength=e))
  want = np.zeros((n, d), np.float32)
  for t in range(n):
    for j in range(k):
      ex = ids[t, j]
      g, u = x[t] @ p["gate"][ex], x[t] @ p["up"][ex]
      want[t] += gates[t, j] * ((g / (1 + np.exp(-g)) * u) @ p["down"][ex])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- aux statistics
def test_aux_outputs_and_padding(moe_config):
  cfg = moe_config
  params = random_params(cfg)
  toks = _tokens(cfg, (B, T))
  seg = jnp.ones((B, T), jnp.int32).at[1, 8:].set(0)
  logits, aux = fwd(cfg, params, toks, segment_ids=seg, return_aux=True)
  np.testing.assert_array_equal(logits, fwd(cfg, params, toks, segment_ids=seg))
  assert set(aux) == {"moe_aux_loss", "router_z_loss", "expert_load", "moe_dropped"}
  assert int(aux["moe_dropped"]) == 0  # dropless by default
  assert aux["expert_load"].shape == (cfg.n_moe_layers, cfg.moe.n_experts)
  np.testing.assert_allclose(aux["expert_load"].sum(-1), 1.0, rtol=1e-5)
  assert float(aux["moe_aux_loss"]) > 0
  assert (float(aux["router_z_loss"]) > 0) == (cfg.moe.router_z_loss_coef > 0)
  # Padding is not counted: other pad tokens give the same statistics.
  _, aux2 = fwd(cfg, params, toks.at[1, 8:].set(0), segment_ids=seg, return_aux=True)
  for key in aux:
    np.testing.assert_allclose(aux[key], aux2[key], rtol=1e-5)


def test_switch_balance_loss_matches_numpy():
  cfg = MOE_CONFIGS["mixtral"]
  rng = np.random.default_rng(3)
  b, t, e, k = 2, 5, cfg.moe.n_experts, cfg.moe.n_experts_per_tok
  logits = rng.normal(size=(b, t, e)).astype(np.float32)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  ids = np.argsort(-probs, -1)[..., :k]
  w = np.ones((b, t), np.float32)
  w[1, 3:] = 0
  stats = moe._stats(cfg, jnp.asarray(ids), jnp.asarray(logits), jnp.asarray(probs), jnp.asarray(w))
  m = w.astype(bool)
  counts = np.zeros(e)
  for i in ids[m].reshape(-1):
    counts[i] += 1
  f, pm = counts / (k * m.sum()), probs[m].mean(0)
  np.testing.assert_allclose(float(stats["balance_loss"]), e * (f * pm).sum(), rtol=1e-5)
  lse = np.log(np.exp(logits[m]).sum(-1))
  np.testing.assert_allclose(float(stats["z_loss"]), (lse ** 2).mean(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(stats["expert_load"]), f, rtol=1e-5)


def test_balance_losses_are_one_when_balanced():
  """f_i = 1/E and uniform probabilities: both the Switch and the sequence-wise loss equal 1."""
  for cfg in MOE_CONFIGS.values():
    e, k = cfg.moe.n_experts, cfg.moe.n_experts_per_tok
    ids = (np.arange(e).reshape(-1, k))[None]  # [1, E / k, k]: every expert once.
    probs = np.full((1, e // k, e), 1.0 / e if cfg.moe.router == "softmax" else 0.5, np.float32)
    stats = moe._stats(cfg, jnp.asarray(ids), jnp.zeros((1, e // k, e)), jnp.asarray(probs),
                       jnp.ones((1, e // k)))
    np.testing.assert_allclose(float(stats["balance_loss"]), 1.0, rtol=1e-5)


def test_gradients(moe_config):
  """The balance loss trains the router; the routing bias gets no gradient (it only selects experts); with MTP
  (DeepSeek), its loss reaches the MTP module, the shared embedding and head, and the trunk's experts."""
  cfg = moe_config.replace(mtp_depth=1) if moe_config.family == "deepseek_v3" else moe_config
  params = random_params(cfg)
  toks = _tokens(cfg, (B, T))

  def loss(p):
    logits, aux = models.forward(cfg, p, toks, return_aux=True)
    total = 1e-3 * jnp.mean(logits ** 2) + aux["moe_aux_loss"]
    if "mtp_logits" in aux:
      logp = jax.nn.log_softmax(aux["mtp_logits"][0, :, :-2])
      total -= jnp.mean(jnp.take_along_axis(logp, toks[:, 2:, None], -1))
    return total

  g = jax.jit(jax.grad(loss))(params)
  nonzero = [("layers_moe", "router", "kernel"), ("layers_moe", "experts", "up"), ("embed", "embedding")]
  if cfg.mtp.depth:
    nonzero += [("mtp", "proj", "kernel"), ("mtp", "block", "attn", "kv_b", "kernel"), ("lm_head", "kernel")]
  for path in nonzero:
    assert float(jnp.abs(_get(g, path)).max()) > 0, path
  if cfg.moe.router == "sigmoid":
    assert float(jnp.abs(g["layers_moe"]["router"]["bias"]).max()) == 0


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def test_update_router_bias_and_trainable_mask():
  load = jnp.asarray([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])
  new = moe.update_router_bias(jnp.zeros((2, 4)), load, 0.01)
  np.testing.assert_allclose(new, [[-0.01, 0.0, 0.0, 0.01], [0.0, 0.0, 0.0, 0.0]])
  mask = moe.trainable_mask(random_params(MOE_CONFIGS["deepseek_v3"].replace(mtp_depth=1)))
  assert mask["layers_moe"]["router"]["bias"] is False and mask["layers_moe"]["router"]["kernel"] is True
  assert mask["mtp"]["block"]["router"]["bias"] is False
  assert sum(not m for m in jax.tree.leaves(mask)) == 2


def test_dense_forward_is_unchanged_and_aux_is_zero():
  cfg = models.preset("llama3-8b", **TINY, n_layers=2, n_kv_heads=2)
  params = random_params(cfg)
  assert set(params) == {"embed", "layers", "final_norm", "lm_head"}
  toks = _tokens(cfg, (B, T))
  logits, aux = fwd(cfg, params, toks, return_aux=True)
  np.testing.assert_array_equal(logits, fwd(cfg, params, toks))
  assert set(aux) == {"moe_aux_loss", "router_z_loss"} and float(aux["moe_aux_loss"]) == 0


# ----------------------------------------------------------------------------------- model behaviour
def test_packed_documents_equal_documents_alone():
  """Routing is per token: two packed documents give the logits of each alone (right-padded)."""
  cfg = MOE_CONFIGS["deepseek_v3"]
  params = random_params(cfg)
  docs = _tokens(cfg, (B, T // 2), seed=1)
  packed = jnp.concatenate([docs[0], docs[1]])[None].repeat(B, 0)
  seg = jnp.repeat(jnp.arange(1, 3), T // 2)[None].repeat(B, 0)
  pos = jnp.tile(jnp.arange(T // 2), 2)[None].repeat(B, 0)
  out = fwd(cfg, params, packed, segment_ids=seg, positions=pos)
  alone = fwd(cfg, params, jnp.pad(docs, ((0, 0), (0, T // 2))),
              segment_ids=jnp.ones((B, T), jnp.int32).at[:, T // 2:].set(0))
  np.testing.assert_allclose(out[0, :T // 2], alone[0, :T // 2], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out[0, T // 2:], alone[1, :T // 2], atol=1e-5, rtol=1e-5)


def test_kv_cache_prefill_and_decode_equal_forward(moe_config):
  """MLA decodes from the latent cache with kv_b absorbed; it must equal the expanded full forward."""
  cfg = moe_config
  params = random_params(cfg)
  toks = _tokens(cfg, (B, T))
  ref = fwd(cfg, params, toks)
  cache = models.init_cache(cfg, B, 16)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  seg = jnp.ones((B, T), jnp.int32)
  logits, cache = step(cfg, params, toks[:, :7], cache, 0, positions=pos[:, :7], segment_ids=seg[:, :7])
  outs = [logits]
  for i in range(7, T):
    logits, cache = step(cfg, params, toks[:, i:i + 1], cache, i, positions=pos[:, i:i + 1],
                         segment_ids=seg[:, i:i + 1])
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), ref, atol=2e-5, rtol=2e-5)


def test_mla_cache_holds_only_the_latent_and_the_rope_key():
  cfg = MOE_CONFIGS["deepseek_v3"]
  cache = models.init_cache(cfg, 3, 20)
  assert {k: v.shape for k, v in cache.items()} == {
      "kv_latent": (cfg.n_layers, 3, 20, cfg.attention.kv_lora_rank),
      "k_rope": (cfg.n_layers, 3, 20, cfg.attention.qk_rope_head_dim),
      "segment_ids": (3, 20)}


def test_generate_with_left_padding():
  """Batched greedy generation of left-padded prompts equals each prompt alone (MLA and MoE through the cache)."""
  cfg = MOE_CONFIGS["deepseek_v3"]
  params = random_params(cfg)
  prompts = [[5, 17, 3, 44, 9, 12, 70], [8, 2]]
  batched = generate(cfg, params, prompts, max_new_tokens=4, pad_multiple=8)
  assert batched == [generate(cfg, params, [p], max_new_tokens=4, pad_multiple=8)[0] for p in prompts]


def test_mla_without_q_latent_and_default_rope():
  cfg = MOE_CONFIGS["deepseek_v3"].replace(q_lora_rank=None, rope_type="default", rope_scaling=(),
                                           rope_interleave=False)
  params = random_params(cfg)
  assert "q" in params["layers"]["attn"] and "q_a" not in params["layers"]["attn"]
  toks = _tokens(cfg, (B, T))
  full = fwd(cfg, params, toks)
  cache = models.init_cache(cfg, B, T)
  pos, seg = jnp.broadcast_to(jnp.arange(T), (B, T)), jnp.ones((B, T), jnp.int32)
  logits, _ = step(cfg, params, toks, cache, 0, positions=pos, segment_ids=seg)
  np.testing.assert_allclose(logits, full, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------------------ MTP
def test_mtp_is_off_by_default_and_adds_outputs_only():
  cfg = MOE_CONFIGS["deepseek_v3"]
  assert "mtp" not in random_params(cfg)
  cfg = cfg.replace(mtp_depth=1)
  params = random_params(cfg)
  toks = _tokens(cfg, (B, T))
  logits, aux = fwd(cfg, params, toks, return_aux=True)
  assert aux["mtp_logits"].shape == (1, B, T, cfg.vocab_size)
  # The main logits are those of the model without MTP.
  without = {k: v for k, v in params.items() if k != "mtp"}
  np.testing.assert_allclose(logits, fwd(cfg.replace(mtp_depth=0), without, toks), atol=1e-6)
  # Position i predicts token i + 2: changing token i + 1 changes its MTP logits, token i + 2 does not.
  a = fwd(cfg, params, toks.at[0, 5].set((toks[0, 5] + 1) % cfg.vocab_size), return_aux=True)[1]["mtp_logits"]
  diff = np.abs(np.asarray(a - aux["mtp_logits"]))[0, 0].max(-1)
  assert diff[4] > 0 and (diff[:4] == 0).all()


# ------------------------------------------------------------------------------- presets, axes, config
def test_presets_have_the_published_sizes():
  """Total parameters from the shapes alone: Mixtral 8x7B 46.7B; DeepSeek-V3 671B without its MTP module."""
  def count(cfg):
    return sum(math.prod(s.shape) for s in jax.tree.leaves(models.param_shapes(cfg)))
  assert abs(count(models.preset("mixtral-8x7b")) / 46.7e9 - 1) < 0.01
  assert abs(count(models.preset("deepseek-v3", mtp_depth=0)) / 671e9 - 1) < 0.01


def test_expert_weights_have_the_expert_axis(moe_config):
  params = jax.eval_shape(lambda key: models.init(moe_config, key), jax.random.key(0))
  axes = models.param_axes(moe_config)
  flat_p = jax.tree_util.tree_leaves_with_path(params)
  flat_a = jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))
  assert [p for p, _ in flat_p] == [p for p, _ in flat_a]
  for (_, value), (_, names) in zip(flat_p, flat_a):
    assert len(names) == value.ndim
  for name in ("gate", "up", "down"):
    assert models.param_axes(moe_config)["layers_moe"]["experts"][name][:2] == ("layers", "expert")
  # The DeepSeek-V3 router stays float32 (like transformers'), so that small bias updates are not lost.
  bf16 = jax.eval_shape(lambda key: models.init(moe_config.replace(param_dtype="bfloat16"), key), jax.random.key(0))
  router_dtype = "float32" if moe_config.moe.router == "sigmoid" else "bfloat16"
  assert {x.dtype.name for x in jax.tree.leaves(bf16["layers_moe"]["router"])} == {router_dtype}
  assert bf16["layers_moe"]["experts"]["up"].dtype.name == "bfloat16"


def test_config_json_round_trip(moe_config):
  assert ModelConfig.from_json(moe_config.to_json()) == moe_config


@pytest.mark.parametrize("change,message", [
    (dict(n_experts_per_tok=9), "n_experts_per_tok"),
    (dict(n_group=3, router="sigmoid"), "n_group"),
    (dict(n_group=2, topk_group=1), "sigmoid"),
    (dict(first_k_dense=2), "first_k_dense"),
    (dict(attention="mqa"), "attention"),
    (dict(rope_type="yarn", rope_scaling=(("factor", 2.0), ("original_max_position_embeddings", 8.0))), "yarn"),
])
def test_config_errors_say_what_to_change(change, message):
  with pytest.raises(ValueError, match=message):
    MOE_CONFIGS["mixtral"].replace(**change)
