"""Multi-head latent attention (MLA) of DeepSeek-V2 (arXiv:2405.04434, section 2.1) and DeepSeek-V3.

Queries: h -> q_a [Q] -> RMSNorm -> q_b -> per head [nope N | rope P] (one `q` projection when q_lora_rank is None).
Keys and values: h -> kv_a -> [latent c_kv (C) | k_rope (P)]; c_kv is RMSNormed and kv_b expands it per head into
[k_nope N | v U]. The RoPE key is a single head shared by all heads. Scores are scaled by 1/sqrt(N + P) (times
YaRN's mscale^2 when the RoPE is scaled, as transformers does).

The KV cache holds, per token, only c_kv (after its norm) and the rotated k_rope: C + P numbers instead of
2 * H * head_dim. Decoding "absorbs" kv_b: the query is mapped into the latent space (q_nope @ W_uk) and the
attention output back out of it (@ W_uv), so the cache is never expanded per head.

Shape suffixes: B batch, T query length, S key length, D d_model, H heads, Q q_lora_rank, C kv_lora_rank,
N qk_nope_head_dim, P qk_rope_head_dim, U v_head_dim.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jpllm_jax.models import layers
from jpllm_jax.models.config import ModelConfig
from jpllm_jax.models.layers import ParamSpec
from jpllm_jax.parallel.logical import logical_constraint

LATENT_NORM_EPS = 1e-6  # transformers' q_a_layernorm / kv_a_layernorm keep the RMSNorm default, not rms_norm_eps.


def param_specs(cfg: ModelConfig, n: int) -> dict:
  """The attention weights of `n` stacked layers."""
  D, H, C = cfg.d_model, cfg.attention.n_heads, cfg.attention.kv_lora_rank
  N, P, U = cfg.attention.qk_nope_head_dim, cfg.attention.qk_rope_head_dim, cfg.attention.v_head_dim

  def w(shape, axes, init="normal"):
    return {"kernel": ParamSpec((n, *shape), ("layers", *axes), init)}

  specs = {}
  if cfg.attention.q_lora_rank is None:
    specs["q"] = w((D, H, N + P), ("embed", "heads", "head_dim"))
  else:
    Q = cfg.attention.q_lora_rank
    specs["q_a"] = w((D, Q), ("embed", "q_lora"))
    specs["q_norm"] = {"scale": ParamSpec((n, Q), ("layers", "q_lora"), "ones")}
    specs["q_b"] = w((Q, H, N + P), ("q_lora", "heads", "head_dim"))
  specs["kv_a"] = w((D, C + P), ("embed", "kv_lora"))
  specs["kv_norm"] = {"scale": ParamSpec((n, C), ("layers", "kv_lora"), "ones")}
  specs["kv_b"] = w((C, H, N + U), ("kv_lora", "heads", "head_dim"))
  specs["o"] = w((H, U, D), ("heads", "head_dim", "embed"), "out")
  return specs


def softmax_scale(cfg: ModelConfig) -> float:
  """1/sqrt(N + P), times YaRN's mscale(factor, mscale_all_dim)^2 for a scaled RoPE (transformers' rule)."""
  scale = 1.0 / math.sqrt(cfg.attention.qk_nope_head_dim + cfg.attention.qk_rope_head_dim)
  p = cfg.rope_params
  if cfg.rope_type != "default" and p.get("mscale_all_dim"):
    scale *= layers.yarn_mscale(p["factor"], p["mscale_all_dim"]) ** 2
  return scale


def _project(cfg: ModelConfig, p: dict, h_BTD, positions, inv_freq):
  """q_nope [B,T,H,N], rotated q_rope [B,T,H,P], normed latent c_kv [B,T,C], rotated k_rope [B,T,P]."""
  N, C = cfg.attention.qk_nope_head_dim, cfg.attention.kv_lora_rank
  if cfg.attention.q_lora_rank is None:
    q = layers.dense(h_BTD, p["q"], "btd,dhe->bthe", "attn")
  else:
    q = layers.dense(h_BTD, p["q_a"], "btd,dq->btq", "attn")
    q = layers.dense(layers.rms_norm(q, p["q_norm"]["scale"], LATENT_NORM_EPS), p["q_b"], "btq,qhe->bthe", "attn")
  q = checkpoint_name(logical_constraint(q, ("batch", "length", "heads", "head_dim")), "qkv_proj")
  kv = checkpoint_name(layers.dense(h_BTD, p["kv_a"], "btd,dc->btc", "attn"), "qkv_proj")
  c_kv = layers.rms_norm(kv[..., :C], p["kv_norm"]["scale"], LATENT_NORM_EPS)
  q_nope, q_rope, k_rope = q[..., :N], q[..., N:], kv[..., None, C:]
  if cfg.attention.rope_interleave:
    q_rope, k_rope = layers.deinterleave(q_rope), layers.deinterleave(k_rope)
  factor = layers.rope_attention_factor(cfg)
  q_rope = layers.apply_rope(q_rope, positions, inv_freq)
  k_rope = layers.apply_rope(k_rope, positions, inv_freq)[:, :, 0]
  if factor != 1.0:
    q_rope, k_rope = q_rope * jnp.asarray(factor, q_rope.dtype), k_rope * jnp.asarray(factor, k_rope.dtype)
  return q_nope, q_rope, c_kv, k_rope


def attention(cfg: ModelConfig, p: dict, h_BTD, positions, mask, kv_write: Callable | None, inv_freq):
  """The attention output [B, T, D] (after the output projection) of the normed input `h_BTD`.

  Without `kv_write` (training, scoring) keys and values are expanded per head and attention runs as
  multi-head attention. With it (`kv_write(c_kv, k_rope) -> (c_kv_all, k_rope_all)` inserts into the cache),
  kv_b is absorbed into the query and the output.
  """
  N, H = cfg.attention.qk_nope_head_dim, cfg.attention.n_heads
  q_nope, q_rope, c_kv, k_rope = _project(cfg, p, h_BTD, positions, inv_freq)
  scale = softmax_scale(cfg)
  if kv_write is None:
    kv = layers.dense(c_kv, p["kv_b"], "btc,che->bthe", "attn")
    k_nope, v = kv[..., :N], kv[..., N:]
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], (*k_rope.shape[:2], H, k_rope.shape[-1]))],
                        axis=-1)
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    a = layers.causal_attention(q, k, v, mask, cfg.attention.sliding_window, scale=scale)
  else:
    c_all, r_all = kv_write(c_kv, k_rope)
    a = absorbed_attention(q_nope, q_rope, c_all, r_all, p["kv_b"]["kernel"], mask, N, scale)
  a = logical_constraint(a, ("batch", "length", "heads", "head_dim"))
  return layers.dense(a, p["o"], "bthe,hed->btd", "attn")


def absorbed_attention(q_nope_BTHN, q_rope_BTHP, c_BSC, k_rope_BSP, kv_b_CHE, mask_BTS, n_nope: int, scale: float):
  """Attention over the latent cache: scores q_nope W_uk^T c^T + q_rope k_rope^T, output (probs c) W_uv."""
  w_uk, w_uv = kv_b_CHE[..., :n_nope], kv_b_CHE[..., n_nope:]
  q_lat = jnp.einsum("bthn,chn->bthc", q_nope_BTHN, w_uk)
  s = jnp.einsum("bthc,bsc->bhts", q_lat, c_BSC, preferred_element_type=jnp.float32)
  s = s + jnp.einsum("bthp,bsp->bhts", q_rope_BTHP, k_rope_BSP, preferred_element_type=jnp.float32)
  s = jnp.where(mask_BTS[:, None], s * scale, layers.MASK_VALUE)
  probs = jax.nn.softmax(s, axis=-1).astype(c_BSC.dtype)
  o_lat = jnp.einsum("bhts,bsc->bthc", probs, c_BSC)
  return jnp.einsum("bthc,chu->bthu", o_lat, w_uv)
