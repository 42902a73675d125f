"""The decoder stack shared by all families: parameter table, init, forward, KV-cache forward.

Parameters are a plain nested dict of arrays. The layers are stacked on a leading `layers` axis and run
with `jax.lax.scan`, so compile time does not grow with depth. `param_specs` is the single table of
every weight's shape, logical axes and initialiser; `init` and `param_axes` are both read off it.

Stacks (described in stacks.py, which every reader follows): `layers` holds the layers with the dense MLP (all
of them in a dense model); a mixture-of-experts model puts its MoE layers (moe.py) in a second stack `layers_moe`,
after the first `first_k_dense` dense ones; `mtp` holds the optional multi-token-prediction modules, whose blocks
are a third stack. Attention is grouped-query attention or, with `attention="mla"`, DeepSeek's latent attention
(mla.py).
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jpllm_jax.models import fp8, layers, mla, moe, stacks
from jpllm_jax.models.strategy import probe
from jpllm_jax.models.config import ModelConfig
from jpllm_jax.models.layers import ParamSpec
from jpllm_jax.parallel.logical import logical_constraint

Params = dict[str, Any]
BTD = ("batch", "length", "embed")


def param_specs(cfg: ModelConfig) -> dict[str, Any]:
  """Nested dict of `ParamSpec`, with the structure of the parameters."""
  D, V, M = cfg.d_model, cfg.vocab_size, cfg.mtp.depth
  specs = {
      "embed": {"embedding": ParamSpec((V, D), ("vocab", "embed"), "normal")},
      "final_norm": _norm_specs(cfg),
  }
  if cfg.learned_positions:
    specs["pos_embed"] = {"embedding": ParamSpec((cfg.max_seq_len, D), (None, "embed"), "normal")}
  if not cfg.tie_embeddings:
    specs["lm_head"] = {"kernel": ParamSpec((D, V), ("embed", "vocab"), "normal")}
  if M:  # DeepSeek-V3 MTP modules: norms of the embedding and the hidden state, their projection, a block, a norm.
    specs["mtp"] = {"enorm": _norm_specs(cfg, M), "hnorm": _norm_specs(cfg, M),
                    "proj": {"kernel": ParamSpec((M, 2 * D, D), ("layers", None, "embed"), "normal")},
                    "norm": _norm_specs(cfg, M)}
  for s in stacks.stacks(cfg):  # the layer stacks (the MTP blocks: "mtp"/"block")
    stacks.put(specs, s, _layer_specs(cfg, s.n, moe_layer=s.moe))
  return specs


def _norm_specs(cfg: ModelConfig, n: int | None = None) -> dict[str, ParamSpec]:
  lead, lead_axes = ((), ()) if n is None else ((n,), ("layers",))
  p = {"scale": ParamSpec((*lead, cfg.d_model), (*lead_axes, "embed"), "ones")}
  if cfg.norm == "layer":
    p["bias"] = ParamSpec((*lead, cfg.d_model), (*lead_axes, "embed"), "zeros")
  return p


def _layer_specs(cfg: ModelConfig, L: int, moe_layer: bool) -> dict[str, Any]:
  """The weights of `L` stacked layers: attention, and the dense MLP or the MoE feed-forward."""
  D, H, K, E, F = cfg.d_model, cfg.attention.n_heads, cfg.attention.num_heads_kv, cfg.dim_per_head, cfg.d_ff

  def proj(shape, axes, bias_shape=None, bias_axes=None, init="normal"):
    p = {"kernel": ParamSpec((L, *shape), ("layers", *axes), init)}
    if bias_shape is not None:
      p["bias"] = ParamSpec((L, *bias_shape), ("layers", *bias_axes), "zeros")
    return p

  qkv_b = cfg.attention.qkv_bias
  if cfg.attention.kind == "mla":
    attn = mla.param_specs(cfg, L)
  else:
    attn = {
        "q": proj((D, H, E), ("embed", "heads", "head_dim"),
                  *(((H, E), ("heads", "head_dim")) if qkv_b else ())),
        "k": proj((D, K, E), ("embed", "kv_heads", "head_dim"),
                  *(((K, E), ("kv_heads", "head_dim")) if qkv_b else ())),
        "v": proj((D, K, E), ("embed", "kv_heads", "head_dim"),
                  *(((K, E), ("kv_heads", "head_dim")) if qkv_b else ())),
        "o": proj((H, E, D), ("heads", "head_dim", "embed"), *(((D,), ("embed",)) if cfg.attention.out_bias else ()),
                  init="out"),
    }
  layer = {"attn_norm": _norm_specs(cfg, L), "attn": attn, "mlp_norm": _norm_specs(cfg, L)}
  if moe_layer:
    layer.update(moe.param_specs(cfg, L))
    return layer
  mlp_b = cfg.mlp_bias
  mlp = {
      "up": proj((D, F), ("embed", "mlp"), *(((F,), ("mlp",)) if mlp_b else ())),
      "down": proj((F, D), ("mlp", "embed"), *(((D,), ("embed",)) if mlp_b else ()), init="out"),
  }
  if cfg.mlp == "swiglu":
    mlp["gate"] = proj((D, F), ("embed", "mlp"), *(((F,), ("mlp",)) if mlp_b else ()))
  layer["mlp"] = mlp
  return layer


def _is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def param_axes(cfg: ModelConfig) -> dict[str, Any]:
  """Logical axis names of every parameter, with the structure of the parameters."""
  return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def param_kinds(cfg: ModelConfig) -> dict[str, Any]:
  """The kind of every parameter, read from its initialiser (what the optimizer labels by): "weight" (matrices
  and embeddings), "scale" (norms), "bias", or "router_bias" (moved by `moe.update_router_biases`, not gradients)."""
  def kind(path, spec: ParamSpec) -> str:
    if moe.is_router_bias(path):
      return "router_bias"
    return {"ones": "scale", "zeros": "bias"}.get(spec.init, "weight")
  return jax.tree_util.tree_map_with_path(kind, param_specs(cfg), is_leaf=_is_spec)


def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
  """`jax.ShapeDtypeStruct` of every parameter (no memory allocated)."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype or cfg.numerics.param_dtype)),
                      param_specs(cfg), is_leaf=_is_spec)


def param_name(path) -> str:
  """A parameter's stable name, its path in the table joined by "/" ("layers/attn/q/kernel")."""
  return "/".join(str(getattr(k, "key", k)) for k in path)


def init_key(rng: jax.Array, name: str) -> jax.Array:
  """The key of parameter `name`: `rng` folded with the CRC-32 of the name, a hash that is the same in every
  process and Python run (`hash()` is salted per process), so a parameter's draw depends only on (seed, name):
  adding, removing or reordering other parameters leaves it unchanged, and no mesh or process enters it."""
  return jax.random.fold_in(rng, zlib.crc32(name.encode()))


def init(cfg: ModelConfig, rng: jax.Array) -> Params:
  """Random parameters: normal(init_std) matrices, residual outputs scaled by 1/sqrt(2 n_layers); each
  parameter drawn from its own key, `init_key(rng, its name)`."""
  specs = param_specs(cfg)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec)
  names = [param_name(path) for path, _ in leaves]
  hashes = [zlib.crc32(n.encode()) for n in names]
  if len(set(hashes)) != len(hashes):  # two parameters would share a key: rename one.
    raise ValueError(f"parameters with the same CRC-32: {[n for n, h in zip(names, hashes) if hashes.count(h) > 1]}")
  out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.scaled_out_init else cfg.init_std

  def make(spec: ParamSpec, name: str):
    dtype = jnp.dtype(spec.dtype or cfg.numerics.param_dtype)
    if spec.init == "ones":
      return jnp.ones(spec.shape, dtype)
    if spec.init == "zeros":
      return jnp.zeros(spec.shape, dtype)
    std = out_std if spec.init == "out" else cfg.init_std
    return (std * jax.random.normal(init_key(rng, name), spec.shape, jnp.float32)).astype(dtype)

  return jax.tree.unflatten(treedef, [make(s, n) for (_, s), n in zip(leaves, names)])


# ------------------------------------------------------------------------------------------ forward
def _gqa(cfg: ModelConfig, p: Params, h, positions, mask, kv_write: Callable | None, inv_freq):
  """Grouped-query attention of the normed input, after the output projection."""
  q = layers.dense(h, p["q"], "btd,dhe->bthe")
  k = layers.dense(h, p["k"], "btd,dke->btke")
  v = layers.dense(h, p["v"], "btd,dke->btke")
  q = checkpoint_name(logical_constraint(q, ("batch", "length", "heads", "head_dim")), "qkv_proj")
  k = checkpoint_name(logical_constraint(k, ("batch", "length", "kv_heads", "head_dim")), "qkv_proj")
  v = checkpoint_name(logical_constraint(v, ("batch", "length", "kv_heads", "head_dim")), "qkv_proj")
  if inv_freq is not None:
    q = layers.apply_rope(q, positions, inv_freq)
    k = layers.apply_rope(k, positions, inv_freq)
  if kv_write is None:
    a = layers.causal_attention(q, k, v, mask, cfg.attention.sliding_window)
  else:
    k, v = kv_write(k, v)
    a = layers.attention(q, k, v, mask)
  a = logical_constraint(a, ("batch", "length", "heads", "head_dim"))
  return layers.dense(a, p["o"], "bthe,hed->btd")


def _mlp(cfg: ModelConfig, p: Params, h):
  up = layers.dense(h, p["up"], "btd,df->btf")
  if cfg.mlp == "swiglu":
    up = probe("mlp.activation", layers.activation(cfg.activation, layers.dense(h, p["gate"], "btd,df->btf")),
               ("batch", "length", "mlp")) * up
  else:
    up = probe("mlp.activation", layers.activation(cfg.activation, up), ("batch", "length", "mlp"))
  up = logical_constraint(up, ("batch", "length", "mlp"))
  return layers.dense(up, p["down"], "btf,fd->btd")


def _block(cfg: ModelConfig, p: Params, x, positions, mask, kv_write: Callable | None, inv_freq,
           token_weights=None, with_stats: bool = False):
  """One pre-norm block; returns (x, MoE statistics or None).

  `kv_write(a, b) -> (a_all, b_all)` inserts this step's keys/values (MLA: latent and RoPE key) into a
  cache when decoding. `token_weights` [B, T] (0 on padding) weight the MoE statistics.
  """
  # `probe`: identity, except in the checking run that locates a non-finite value (train/nonfinite.py).
  h = probe("attn_norm", layers.norm(cfg, p["attn_norm"], x), BTD)
  attend = mla.attention if cfg.attention.kind == "mla" else _gqa
  x = x + probe("attention", attend(cfg, p["attn"], h, positions, mask, kv_write, inv_freq), BTD)
  x = logical_constraint(x, BTD)

  h = probe("mlp_norm", layers.norm(cfg, p["mlp_norm"], x), BTD)
  if "router" in p:
    y, stats = moe.ffn(cfg, p, h, token_weights, with_stats)
  else:
    y, stats = _mlp(cfg, p["mlp"], h), None
  x = x + probe("moe" if "router" in p else "mlp", y, BTD)
  return probe("residual", logical_constraint(x, BTD), BTD), stats


def embed(cfg: ModelConfig, params: Params, tokens, positions):
  """Token (and learned position) embeddings [B, T, D] in the compute dtype: the first piece of the decoder."""
  dtype = jnp.dtype(cfg.numerics.dtype)
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
  logits = layers.matmul(f"btd,{layout}->btv", x, w, name="lm_head", preferred_element_type=jnp.float32)
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
  if cfg.numerics.remat == "none":
    return body
  policies = jax.checkpoint_policies
  policy = {
      "full": None,  # save nothing: recompute the whole layer.
      "save_dots": policies.checkpoint_dots,
      "save_dots_no_batch": policies.dots_with_no_batch_dims_saveable,
      "save_qkv_proj": policies.save_only_these_names("qkv_proj"),
  }[cfg.numerics.remat]
  return jax.checkpoint(body, policy=policy, prevent_cse=False)


def _cast_layer(p, dtype):
  """The layer's weights in the compute dtype; the router stays as stored (it computes in float32), and so do the
  FP8 amax histories (fp8_delayed: models/fp8.py)."""
  keep = lambda path: path[0].key == "router" or path[-1].key == fp8.HISTORY  # noqa: E731
  return jax.tree_util.tree_map_with_path(lambda path, w: w if keep(path) else w.astype(dtype), p)


@dataclasses.dataclass(frozen=True)
class Context:
  """What every block of a full-sequence forward reads besides its weights and input: positions [B, T],
  segment ids [B, T] (0: padding), rotary inverse frequencies (None without RoPE) and the token weights of the
  MoE statistics. The attention mask is formed from it where a stack runs, so a pipeline stage needs only this."""
  positions: jax.Array
  segment_ids: jax.Array
  inv_freq: jax.Array | None
  token_weights: jax.Array

  def mask(self, cfg: ModelConfig) -> jax.Array:
    index = jnp.broadcast_to(jnp.arange(self.segment_ids.shape[1], dtype=jnp.int32), self.segment_ids.shape)
    return layers.attention_mask(index, index[0], self.segment_ids, self.segment_ids, cfg.attention.sliding_window)


def context(cfg: ModelConfig, tokens, positions=None, segment_ids=None) -> Context:
  """The `Context` of `tokens` [B, T]; missing positions count from 0, missing segment ids make one document."""
  positions, segment_ids = _default_inputs(tokens, positions, segment_ids)
  inv_freq = layers.rope_inv_freq(cfg) if cfg.rope_theta is not None else None
  return Context(positions, segment_ids, inv_freq, (segment_ids != 0).astype(jnp.float32))


def run_stack(cfg: ModelConfig, stack_params: Params, x, ctx: Context, with_stats: bool = False, active=None):
  """Runs a slice of stacked layers ([L, ...] leaves; a whole stack or a pipeline stage's part of it) over
  x [B, T, D] under `scan` with the config's remat policy; returns (x, MoE statistics stacked over L or None).
  `active` bool [L] (a pipeline stage's padded slice): layers where it is False pass x through, statistics 0."""
  dtype = jnp.dtype(cfg.numerics.dtype)
  mask = ctx.mask(cfg)

  def block(x, p):
    return _block(cfg, _cast_layer(p, dtype), x, ctx.positions, mask, None, ctx.inv_freq, ctx.token_weights,
                  with_stats)

  if active is None:
    return jax.lax.scan(_remat(cfg, block), x, stack_params)

  def body(x, layer):
    p, on = layer
    out = jax.eval_shape(block, x, p)
    def zeros(s):  # typed like the block's statistics (inside a shard_map: the same varying mesh axes)
      z = jnp.zeros(s.shape, s.dtype)
      vary = tuple(getattr(s.manual_axis_type, "varying", ()) or ())
      return jax.lax.pcast(z, vary, to="varying") if vary else z

    skip = lambda x, p: (x, jax.tree.map(zeros, out[1]))  # noqa: E731
    return jax.lax.cond(on, block, skip, x, p)

  return jax.lax.scan(_remat(cfg, body), x, (stack_params, active))


def forward(cfg: ModelConfig, params: Params, tokens, *, positions=None, segment_ids=None, return_aux: bool = False):
  """Logits [B, T, V] (float32) of `tokens` [B, T]; with `return_aux`, (logits, aux).

  `segment_ids` [B, T]: tokens attend only within their own segment (packed documents); 0 is padding.
  `positions` [B, T]: position of each token in its document (restart at 0 for each packed document).

  aux (see `hidden`) adds "mtp_logits" [mtp_depth, B, T, V] when the config has MTP: row k at position i
  predicts token i + k + 2 (its target is tokens[i + k + 2]; mask targets past the end of the document).
  """
  dtype = jnp.dtype(cfg.numerics.dtype)
  if not return_aux:
    return _logits(cfg, params, hidden(cfg, params, tokens, positions=positions, segment_ids=segment_ids), dtype)
  x, aux = hidden(cfg, params, tokens, positions=positions, segment_ids=segment_ids, return_aux=True)
  if "mtp_hidden" in aux:
    aux["mtp_logits"] = jnp.stack([_logits(cfg, params, h, dtype) for h in aux.pop("mtp_hidden")])
  return _logits(cfg, params, x, dtype), aux


def hidden(cfg: ModelConfig, params: Params, tokens, *, positions=None, segment_ids=None, return_aux: bool = False):
  """The final-normed hidden states [B, T, D] (compute dtype) that `head` projects to logits. Training
  takes these to `models.fused_cross_entropy`, which never holds the [B, T, V] logits at once.

  With `return_aux`, returns (hidden, aux), aux a dict of
    "moe_aux_loss"  scalar: moe_aux_loss_coef * the balance loss averaged over the routed layers (Switch loss
                    for the softmax router, DeepSeek-V3's sequence-wise loss for the sigmoid router); 0 for dense
                    models. The routed layers are the MoE layers, then the MTP blocks of a MoE model.
    "router_z_loss" scalar: router_z_loss_coef * the router z-loss averaged over the routed layers; 0 for dense.
    "expert_load"   [n_routed_layers, E] (MoE models): fraction of each routed layer's top-k assignments per
                    expert, the input of `moe.update_router_biases`.
    "moe_dropped"   int32 (MoE models): (token, expert) assignments dropped by the capacity, over all of them.
    "mtp_hidden"    [mtp_depth, B, T, D] (MTP models): final-normed hidden states of the MTP blocks.
  Both losses are ready to add to the language-modelling loss; padding (segment id 0) is not counted.
  """
  ctx = context(cfg, tokens, positions, segment_ids)
  x = embed(cfg, params, tokens, ctx.positions)
  stats = None
  for s in stacks.main_stacks(cfg):
    x, s_stats = run_stack(cfg, stacks.get(params, s), x, ctx, with_stats=return_aux and s.moe)
    if s_stats is not None:
      stats = s_stats if stats is None else _concat_stats(stats, s_stats)
  out = layers.norm(cfg, params["final_norm"], x)
  if not return_aux:
    return out
  zero = jnp.zeros((), jnp.float32)
  aux = {"moe_aux_loss": zero, "router_z_loss": zero}
  if cfg.mtp.depth:
    aux["mtp_hidden"], mtp_stats = _mtp(cfg, params, tokens, x, ctx)
    if mtp_stats is not None:
      stats = mtp_stats if stats is None else _concat_stats(stats, mtp_stats)
  if stats is not None:
    aux.update(moe_aux_loss=cfg.moe.moe_aux_loss_coef * jnp.mean(stats["balance_loss"]),
               router_z_loss=cfg.moe.router_z_loss_coef * jnp.mean(stats["z_loss"]),
               expert_load=stats["expert_load"], moe_dropped=jnp.sum(stats["dropped"]))
  return out, aux


def _concat_stats(a, b):
  """MoE statistics of two routed stacks, stacked over their layers in `stacks` order."""
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


def mtp_hidden(cfg: ModelConfig, params: Params, tokens, h, ctx: Context):
  """The MTP blocks' final-normed outputs [M, B, T, D] and MoE statistics (None for dense blocks) from the last
  block's output h [B, T, D] (the last pipeline stage calls this; see `_mtp`)."""
  return _mtp(cfg, params, tokens, h, ctx)


def _mtp(cfg: ModelConfig, params: Params, tokens, h, ctx: Context):
  """DeepSeek-V3 multi-token prediction (arXiv:2412.19437 section 2.2, eq. 21-23): module k combines the
  previous depth's hidden state h_i (the main model's last block output for k = 0) with the embedding of
  token i + k + 1, h' = W [RMSNorm(emb); RMSNorm(h)], and runs one more block. Returns the final-normed
  outputs [M, B, T, D] and the blocks' MoE statistics stacked over M (None for dense blocks). The embedding
  and the output head are the main model's. Positions past the end of the row see token 0 in place of
  t_{i+k+1}."""
  dtype = jnp.dtype(cfg.numerics.dtype)
  mask = ctx.mask(cfg)
  outs, stats = [], []
  for k in range(cfg.mtp.depth):
    p = jax.tree.map(lambda a, k=k: a[k], params["mtp"])  # module k; its block is the `mtp` stack's row k
    ahead = jnp.pad(tokens[:, k + 1:], ((0, 0), (0, k + 1)))
    e = layers.norm(cfg, p["enorm"], embed(cfg, params, ahead, ctx.positions))
    z = jnp.concatenate([e, layers.norm(cfg, p["hnorm"], h)], axis=-1)
    z = layers.dense(z, _cast_layer(p["proj"], dtype), "btd,de->bte", "mtp_proj")
    h, s = _block(cfg, _cast_layer(p["block"], dtype), z, ctx.positions, mask, None, ctx.inv_freq,
                  ctx.token_weights, True)
    outs.append(layers.norm(cfg, p["norm"], h))
    stats.append(s)
  return jnp.stack(outs), None if stats[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *stats)


# ----------------------------------------------------------------------------------------- KV cache
def _cache_names(cfg: ModelConfig) -> tuple[str, str]:
  return ("kv_latent", "k_rope") if cfg.attention.kind == "mla" else ("k", "v")


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
  """An empty KV cache with the segment id of each slot (0 = empty) and, per layer,
    keys/values [L, B, S, K, E] ("k", "v"), or for MLA only the normed latent [L, B, S, kv_lora_rank]
    ("kv_latent") and the rotated RoPE key shared by the heads [L, B, S, qk_rope_head_dim] ("k_rope").
  """
  dtype = jnp.dtype(dtype or cfg.numerics.dtype)
  lead = (cfg.n_layers, batch, max_len)
  if cfg.attention.kind == "mla":
    shapes = ((*lead, cfg.attention.kv_lora_rank), (*lead, cfg.attention.qk_rope_head_dim))
  else:
    shapes = ((*lead, cfg.attention.num_heads_kv, cfg.dim_per_head),) * 2
  cache = {name: jnp.zeros(shape, dtype) for name, shape in zip(_cache_names(cfg), shapes)}
  cache["segment_ids"] = jnp.zeros((batch, max_len), jnp.int32)
  return cache


def forward_cached(cfg: ModelConfig, params: Params, tokens, cache: dict[str, jax.Array], cache_index,
                   *, positions, segment_ids, last_only: bool = False):
  """Runs `tokens` [B, T] written at cache slots [cache_index, cache_index + T); returns (logits, cache).

  Used for both prefill (T = prompt length) and decoding (T = 1). Slot i of the cache holds sequence
  index i, so causality and the sliding window are the same rules as in `forward`. `last_only`: logits of
  the last position only ([B, 1, V]): a prefill then skips the vocabulary head of every other position.
  """
  dtype = jnp.dtype(cfg.numerics.dtype)
  b, t = tokens.shape
  cache_index = jnp.asarray(cache_index, jnp.int32)
  kv_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32),
                                             (0, cache_index))
  q_index = jnp.broadcast_to(cache_index + jnp.arange(t, dtype=jnp.int32), (b, t))
  k_index = jnp.arange(kv_segments.shape[1], dtype=jnp.int32)
  mask = layers.attention_mask(q_index, k_index, segment_ids, kv_segments, cfg.attention.sliding_window)
  inv_freq = layers.rope_inv_freq(cfg) if cfg.rope_theta is not None else None
  x = embed(cfg, params, tokens, positions)

  def body(x, layer):
    p, a_cache, b_cache = layer
    written = {}

    def kv_write(a, b):
      written["a"] = jax.lax.dynamic_update_slice(a_cache, a.astype(a_cache.dtype),
                                                  (0, cache_index) + (0,) * (a_cache.ndim - 2))
      written["b"] = jax.lax.dynamic_update_slice(b_cache, b.astype(b_cache.dtype),
                                                  (0, cache_index) + (0,) * (b_cache.ndim - 2))
      return written["a"].astype(dtype), written["b"].astype(dtype)

    x, _ = _block(cfg, _cast_layer(p, dtype), x, positions, mask, kv_write, inv_freq)
    return x, (written["a"], written["b"])

  names = _cache_names(cfg)
  parts = []
  for s in stacks.main_stacks(cfg):  # the cache's layer axis spans the main stacks, in order.
    rows = slice(None) if s.n == cfg.n_layers else slice(s.first, s.first + s.n)  # one stack: no slice, no copy
    x, w = jax.lax.scan(body, x, (stacks.get(params, s), cache[names[0]][rows], cache[names[1]][rows]))
    parts.append(w)
  written = parts[0] if len(parts) == 1 else tuple(jnp.concatenate(w) for w in zip(*parts))
  if last_only:
    x = x[:, -1:]
  logits = _logits(cfg, params, layers.norm(cfg, params["final_norm"], x), dtype)
  return logits, {names[0]: written[0], names[1]: written[1], "segment_ids": kv_segments}
