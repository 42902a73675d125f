"""The dense decoder stack shared by all families: parameter table, init, forward, KV-cache forward.

Parameters are a plain nested dict of arrays. The layers are stacked on a leading `layers` axis and run
with `jax.lax.scan`, so compile time does not grow with depth. `param_specs` is the single table of
every weight's shape, logical axes and initialiser; `init` and `param_axes` are both read off it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jpllm_jax.models import layers
from jpllm_jax.models.config import ModelConfig
from jpllm_jax.parallel.logical import logical_constraint

Params = dict[str, Any]
BTD = ("batch", "length", "embed")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  init: str  # "normal", "out" (normal scaled for residual outputs), "ones", "zeros".


def param_specs(cfg: ModelConfig) -> dict[str, Any]:
  """Nested dict of `ParamSpec`, with the structure of the parameters."""
  L, D, H, K, E, F, V = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.num_heads_kv, cfg.dim_per_head,
                         cfg.d_ff, cfg.vocab_size)

  def norm_p(*lead, lead_axes=()):
    p = {"scale": ParamSpec((*lead, D), (*lead_axes, "embed"), "ones")}
    if cfg.norm == "layer":
      p["bias"] = ParamSpec((*lead, D), (*lead_axes, "embed"), "zeros")
    return p

  def proj(shape, axes, bias_shape=None, bias_axes=None, init="normal"):
    p = {"kernel": ParamSpec((L, *shape), ("layers", *axes), init)}
    if bias_shape is not None:
      p["bias"] = ParamSpec((L, *bias_shape), ("layers", *bias_axes), "zeros")
    return p

  qkv_b = cfg.qkv_bias
  attn = {
      "q": proj((D, H, E), ("embed", "heads", "head_dim"), *(((H, E), ("heads", "head_dim")) if qkv_b else ())),
      "k": proj((D, K, E), ("embed", "kv_heads", "head_dim"),
                *(((K, E), ("kv_heads", "head_dim")) if qkv_b else ())),
      "v": proj((D, K, E), ("embed", "kv_heads", "head_dim"),
                *(((K, E), ("kv_heads", "head_dim")) if qkv_b else ())),
      "o": proj((H, E, D), ("heads", "head_dim", "embed"), *(((D,), ("embed",)) if cfg.out_bias else ()),
                init="out"),
  }
  mlp_b = cfg.mlp_bias
  mlp = {
      "up": proj((D, F), ("embed", "mlp"), *(((F,), ("mlp",)) if mlp_b else ())),
      "down": proj((F, D), ("mlp", "embed"), *(((D,), ("embed",)) if mlp_b else ()), init="out"),
  }
  if cfg.mlp == "swiglu":
    mlp["gate"] = proj((D, F), ("embed", "mlp"), *(((F,), ("mlp",)) if mlp_b else ()))
  specs = {
      "embed": {"embedding": ParamSpec((V, D), ("vocab", "embed"), "normal")},
      "layers": {
          "attn_norm": norm_p(L, lead_axes=("layers",)),
          "attn": attn,
          "mlp_norm": norm_p(L, lead_axes=("layers",)),
          "mlp": mlp,
      },
      "final_norm": norm_p(),
  }
  if cfg.learned_positions:
    specs["pos_embed"] = {"embedding": ParamSpec((cfg.max_seq_len, D), (None, "embed"), "normal")}
  if not cfg.tie_embeddings:
    specs["lm_head"] = {"kernel": ParamSpec((D, V), ("embed", "vocab"), "normal")}
  return specs


def _is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def param_axes(cfg: ModelConfig) -> dict[str, Any]:
  """Logical axis names of every parameter, with the structure of the parameters."""
  return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
  """`jax.ShapeDtypeStruct` of every parameter (no memory allocated)."""
  dtype = jnp.dtype(cfg.param_dtype)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(cfg), is_leaf=_is_spec)


def init(cfg: ModelConfig, rng: jax.Array) -> Params:
  """Random parameters: normal(init_std) matrices, residual outputs scaled by 1/sqrt(2 n_layers)."""
  specs = param_specs(cfg)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
  keys = jax.random.split(rng, len(leaves))
  dtype = jnp.dtype(cfg.param_dtype)
  out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.scaled_out_init else cfg.init_std

  def make(spec: ParamSpec, key):
    if spec.init == "ones":
      return jnp.ones(spec.shape, dtype)
    if spec.init == "zeros":
      return jnp.zeros(spec.shape, dtype)
    std = out_std if spec.init == "out" else cfg.init_std
    return (std * jax.random.normal(key, spec.shape, jnp.float32)).astype(dtype)

  return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


# ------------------------------------------------------------------------------------------ forward
def _block(cfg: ModelConfig, p: Params, x, positions, mask, kv_write: Callable | None, inv_freq):
  """One pre-norm block. `kv_write(k, v) -> (k_all, v_all)` inserts into a KV cache when decoding."""
  h = layers.norm(cfg, p["attn_norm"], x)
  q = layers.dense(h, p["attn"]["q"], "btd,dhe->bthe")
  k = layers.dense(h, p["attn"]["k"], "btd,dke->btke")
  v = layers.dense(h, p["attn"]["v"], "btd,dke->btke")
  q = checkpoint_name(logical_constraint(q, ("batch", "length", "heads", "head_dim")), "qkv_proj")
  k = checkpoint_name(logical_constraint(k, ("batch", "length", "kv_heads", "head_dim")), "qkv_proj")
  v = checkpoint_name(logical_constraint(v, ("batch", "length", "kv_heads", "head_dim")), "qkv_proj")
  if inv_freq is not None:
    q = layers.apply_rope(q, positions, inv_freq)
    k = layers.apply_rope(k, positions, inv_freq)
  new_kv = (k, v)
  if kv_write is None:
    a = layers.causal_attention(q, k, v, mask, cfg.sliding_window)
  else:
    k, v = kv_write(k, v)
    a = layers.attention(q, k, v, mask)
  a = logical_constraint(a, ("batch", "length", "heads", "head_dim"))
  x = x + layers.dense(a, p["attn"]["o"], "bthe,hed->btd")
  x = logical_constraint(x, BTD)

  h = layers.norm(cfg, p["mlp_norm"], x)
  up = layers.dense(h, p["mlp"]["up"], "btd,df->btf")
  if cfg.mlp == "swiglu":
    up = layers.activation(cfg.activation, layers.dense(h, p["mlp"]["gate"], "btd,df->btf")) * up
  else:
    up = layers.activation(cfg.activation, up)
  up = logical_constraint(up, ("batch", "length", "mlp"))
  x = x + layers.dense(up, p["mlp"]["down"], "btf,fd->btd")
  return logical_constraint(x, BTD), new_kv


def _embed(cfg: ModelConfig, params: Params, tokens, positions, dtype):
  x = jnp.take(params["embed"]["embedding"], tokens, axis=0).astype(dtype)
  if cfg.scale_embedding:
    x = x * jnp.asarray(math.sqrt(cfg.d_model), dtype)
  if cfg.learned_positions:
    x = x + jnp.take(params["pos_embed"]["embedding"], positions, axis=0).astype(dtype)
  return logical_constraint(x, BTD)


def head(cfg: ModelConfig, params: Params, dtype) -> tuple[jax.Array, str]:
  """The output projection in the compute dtype and its einsum layout: [D, V] ("dv") or, with tied
  embeddings, the embedding table [V, D] ("vd")."""
  if cfg.tie_embeddings:
    return params["embed"]["embedding"].astype(dtype), "vd"
  return params["lm_head"]["kernel"].astype(dtype), "dv"


def _logits(cfg: ModelConfig, params: Params, x, dtype):
  w, layout = head(cfg, params, dtype)
  logits = jnp.einsum(f"btd,{layout}->btv", x, w, preferred_element_type=jnp.float32)
  return logical_constraint(logits, ("batch", "length", "vocab"))


def _default_inputs(tokens, positions, segment_ids):
  b, t = tokens.shape
  if segment_ids is None:
    segment_ids = jnp.ones((b, t), jnp.int32)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return positions, segment_ids


def _remat(cfg: ModelConfig, body):
  """Wraps the scanned layer body in `jax.checkpoint` with the config's policy."""
  if cfg.remat == "none":
    return body
  policies = jax.checkpoint_policies
  policy = {
      "full": None,  # save nothing: recompute the whole layer.
      "save_dots": policies.checkpoint_dots,
      "save_dots_no_batch": policies.dots_with_no_batch_dims_saveable,
      "save_qkv_proj": policies.save_only_these_names("qkv_proj"),
  }[cfg.remat]
  return jax.checkpoint(body, policy=policy, prevent_cse=False)


def _cast_layer(p, dtype):
  return jax.tree.map(lambda w: w.astype(dtype), p)


def forward(cfg: ModelConfig, params: Params, tokens, *, positions=None, segment_ids=None):
  """Logits [B, T, V] (float32) of `tokens` [B, T].

  `segment_ids` [B, T]: tokens attend only within their own segment (packed documents); 0 is padding.
  `positions` [B, T]: position of each token in its document (restart at 0 for each packed document).
  """
  x = hidden(cfg, params, tokens, positions=positions, segment_ids=segment_ids)
  return _logits(cfg, params, x, jnp.dtype(cfg.dtype))


def hidden(cfg: ModelConfig, params: Params, tokens, *, positions=None, segment_ids=None):
  """The final-normed hidden states [B, T, D] (compute dtype) that `head` projects to logits. Training
  takes these to `models.fused_cross_entropy`, which never holds the [B, T, V] logits at once."""
  dtype = jnp.dtype(cfg.dtype)
  positions, segment_ids = _default_inputs(tokens, positions, segment_ids)
  index = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  mask = layers.attention_mask(index, index[0], segment_ids, segment_ids, cfg.sliding_window)
  inv_freq = layers.rope_inv_freq(cfg) if cfg.rope_theta is not None else None
  x = _embed(cfg, params, tokens, positions, dtype)

  def body(x, p):
    x, _ = _block(cfg, _cast_layer(p, dtype), x, positions, mask, None, inv_freq)
    return x, None

  x, _ = jax.lax.scan(_remat(cfg, body), x, params["layers"])
  return layers.norm(cfg, params["final_norm"], x)


# ----------------------------------------------------------------------------------------- KV cache
def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
  """An empty KV cache: keys/values [L, B, S, K, E] and the segment id of each slot (0 = empty)."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.n_layers, batch, max_len, cfg.num_heads_kv, cfg.dim_per_head)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "segment_ids": jnp.zeros((batch, max_len), jnp.int32)}


def forward_cached(cfg: ModelConfig, params: Params, tokens, cache: dict[str, jax.Array], cache_index,
                   *, positions, segment_ids):
  """Runs `tokens` [B, T] written at cache slots [cache_index, cache_index + T); returns (logits, cache).

  Used for both prefill (T = prompt length) and decoding (T = 1). Slot i of the cache holds sequence
  index i, so causality and the sliding window are the same rules as in `forward`.
  """
  dtype = jnp.dtype(cfg.dtype)
  b, t = tokens.shape
  cache_index = jnp.asarray(cache_index, jnp.int32)
  kv_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32),
                                             (0, cache_index))
  q_index = jnp.broadcast_to(cache_index + jnp.arange(t, dtype=jnp.int32), (b, t))
  k_index = jnp.arange(kv_segments.shape[1], dtype=jnp.int32)
  mask = layers.attention_mask(q_index, k_index, segment_ids, kv_segments, cfg.sliding_window)
  inv_freq = layers.rope_inv_freq(cfg) if cfg.rope_theta is not None else None
  x = _embed(cfg, params, tokens, positions, dtype)

  def body(x, layer):
    p, k_cache, v_cache = layer
    written = {}

    def kv_write(k, v):
      written["k"] = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0))
      written["v"] = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0))
      return written["k"].astype(dtype), written["v"].astype(dtype)

    x, _ = _block(cfg, _cast_layer(p, dtype), x, positions, mask, kv_write, inv_freq)
    return x, (written["k"], written["v"])

  x, (k_all, v_all) = jax.lax.scan(body, x, (params["layers"], cache["k"], cache["v"]))
  logits = _logits(cfg, params, layers.norm(cfg, params["final_norm"], x), dtype)
  return logits, {"k": k_all, "v": v_all, "segment_ids": kv_segments}
