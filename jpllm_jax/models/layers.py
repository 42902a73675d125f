"""The parts every decoder family shares: norms, rotary embeddings, masked (grouped-query) attention, MLPs.

Shape suffixes name dimensions: B batch, T query length, S key length, D d_model, H query heads,
K key/value heads, G = H // K query heads per key/value head, E head_dim, F d_ff, V vocab.
Norms, softmax and RoPE run in float32 whatever the compute dtype.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jpllm_jax import cpu
from jpllm_jax.models import fp8
from jpllm_jax.models.config import ModelConfig

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked row gives no NaN.


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One weight of the `param_specs` table: shape, logical axes and initialiser."""
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  init: str  # "normal", "out" (normal scaled for residual outputs), "ones", "zeros".
  dtype: str | None = None  # None: the config's param_dtype (DeepSeek's router is always float32).


# ----------------------------------------------------------------------------------------------- norms
def rms_norm(x, scale, eps: float):
  """Llama's RMSNorm: x / rms(x) * scale."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x, scale, bias, eps: float):
  """GPT's LayerNorm with learned scale and bias."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def norm(cfg: ModelConfig, p: dict, x):
  if cfg.norm == "rms":
    return rms_norm(x, p["scale"], cfg.norm_eps)
  return layer_norm(x, p["scale"], p["bias"], cfg.norm_eps)


# ---------------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: ModelConfig) -> jnp.ndarray:
  """Inverse frequencies [E/2] of the rotary embedding, with the config's scaling rule applied."""
  dim = cfg.rope_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  p = cfg.rope_params
  if cfg.rope_type == "linear":
    inv_freq = inv_freq / p["factor"]
  elif cfg.rope_type == "llama3":
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv_freq = jnp.where(medium, smoothed, scaled)
  elif cfg.rope_type == "yarn":
    # YaRN (arXiv:2309.00071) as transformers computes it: interpolate (divide by `factor`) the frequencies
    # that rotate fewer than beta_slow times over the original context, keep those above beta_fast.
    factor, old_len = p["factor"], p["original_max_position_embeddings"]

    def correction_dim(rotations):
      return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low, high = correction_dim(p.get("beta_fast", 32.0)), correction_dim(p.get("beta_slow", 1.0))
    if p.get("truncate", 1.0):
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / ((high - low) or 0.001), 0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
  return inv_freq


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(cfg: ModelConfig) -> float:
  """YaRN's factor on the rotated q and k (transformers scales cos and sin by it); 1 for other types."""
  if cfg.rope_type != "yarn":
    return 1.0
  p = cfg.rope_params
  if "attention_factor" in p:
    return p["attention_factor"]
  if p.get("mscale") and p.get("mscale_all_dim"):
    return yarn_mscale(p["factor"], p["mscale"]) / yarn_mscale(p["factor"], p["mscale_all_dim"])
  return yarn_mscale(p["factor"])


def apply_rope(x_BTNE, positions_BT, inv_freq):
  """Rotates pairs (i, i + E/2) of each head by position * frequency (the Hugging Face layout)."""
  angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, E/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x = x_BTNE.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNE.dtype)


def deinterleave(x):
  """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): DeepSeek's interleaved RoPE pairs (2i, 2i + 1) in
  the rotate-half layout of `apply_rope`. q and k are permuted alike, so their dot products are unchanged."""
  return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


# ----------------------------------------------------------------------------------------- attention
def attention_mask(q_index_BT, k_index_S, q_segment_BT, k_segment_BS, sliding_window: int | None):
  """[B, T, S] boolean: causal by sequence index, same document, key not padding, inside the window.

  Segment id 0 marks padding (or an empty cache slot); packed documents have distinct ids > 0.
  """
  q_idx = q_index_BT[:, :, None]
  k_idx = k_index_S[None, None, :]
  mask = (k_idx <= q_idx) & (k_segment_BS[:, None, :] == q_segment_BT[:, :, None])
  mask &= (k_segment_BS != 0)[:, None, :]
  if sliding_window is not None:
    mask &= q_idx - k_idx < sliding_window
  return mask


def attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS, scale: float | None = None):
  """Softmax attention with grouped query heads (no key/value repetition); softmax in float32.

  Heads are moved in front so that both products are batched matmuls over (batch, kv head) with the
  G query heads of a group stacked as rows. `scale` defaults to 1/sqrt(E); values may have their own
  head size (MLA's v_head_dim).
  """
  b, t, h, e = q_BTHE.shape
  kv = k_BSKE.shape[2]
  ev = v_BSKE.shape[-1]
  g = h // kv
  scale = 1.0 / math.sqrt(e) if scale is None else scale
  q = q_BTHE.reshape(b, t, kv, g, e).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, e)
  k = k_BSKE.transpose(0, 2, 1, 3)
  v = v_BSKE.transpose(0, 2, 1, 3)
  logits = jnp.einsum("bkqe,bkse->bkqs", q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask_BTS[:, None, None], logits.reshape(b, kv, g, t, -1), MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kv, g * t, -1)
  out = jnp.einsum("bkqs,bkse->bkqe", probs, v)
  return out.reshape(b, kv, g, t, ev).transpose(0, 3, 1, 2, 4).reshape(b, t, h, ev)


def causal_attention(q_BTHE, k_BTKE, v_BTKE, mask_BTT, sliding_window: int | None, block: int = 128,
                     scale: float | None = None):
  """Self-attention of a sequence on itself, skipping key blocks that the causal mask (and the sliding
  window) hide: query block [i, i + block) only reads keys [i - window + 1, i + block). About half the
  FLOPs and memory traffic of the full T x T product for long sequences; identical results.
  """
  t = q_BTHE.shape[1]
  if t <= block:
    return attention(q_BTHE, k_BTKE, v_BTKE, mask_BTT, scale)
  outs = []
  for i in range(0, t, block):
    hi = min(i + block, t)
    lo = 0 if sliding_window is None else max(0, i - sliding_window + 1)
    outs.append(attention(q_BTHE[:, i:hi], k_BTKE[:, lo:hi], v_BTKE[:, lo:hi], mask_BTT[:, i:hi, lo:hi], scale))
  return jnp.concatenate(outs, axis=1)


# ----------------------------------------------------------------------------------------------- MLP
def activation(name: str, x):
  if name == "silu":
    return jax.nn.silu(x)
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  if name == "gelu_tanh":
    return jax.nn.gelu(x, approximate=True)
  if name == "relu":
    return jax.nn.relu(x)
  raise ValueError(f"unknown activation {name!r}")


def dense(x, p: dict, eq: str, name: str = "dense"):
  """Einsum with an optional bias: the one projection helper of the models (`name`: see `matmul`)."""
  y = matmul(eq, x, p["kernel"], name=name, history=p.get(fp8.HISTORY))
  if "bias" in p:
    y = y + p["bias"]
  return y


def matmul(eq: str, x, w, *, name: str = "dense", preferred_element_type=None, history=None):
  """`jnp.einsum(eq, x, w)` for a projection (every index of `w` is in `x` or the output): the one place every
  projection's GEMM goes through. Under the injected FP8 policy (`fp8.current(name)`; `name` one of fp8.NAMES,
  checked against `numerics.fp8_exclude`) it runs as FP8 GEMMs (delayed scaling by the amax `history` of this
  call site, if any); else in the compute dtype, with `preferred_element_type` as jnp.einsum's or, without it,
  a backward pass of two plain einsums (`_einsum`)."""
  pol = fp8.current(name)
  if pol is not None:
    y = fp8.einsum(pol, eq, x, w, history)
    return y if preferred_element_type is None else y.astype(preferred_element_type)
  if preferred_element_type is not None:
    return jnp.einsum(eq, x, w, preferred_element_type=preferred_element_type)
  return _einsum(eq, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum(eq: str, x, w):
  """`jnp.einsum(eq, x, w)` whose backward pass computes dx and dw as two plain einsums of the cotangent.

  On CPU (the platform profile's `grad_barrier`) the cotangent goes through an optimisation barrier first: otherwise XLA fuses the elementwise
  backward ops into a transposing copy for the weight gradient, a slow strided pass over the activations
  (benchmarks/train_throughput.py measures it).
  """
  return jnp.einsum(eq, x, w)


def _einsum_fwd(eq, x, w):
  return jnp.einsum(eq, x, w), (x, w)


def _einsum_bwd(eq, res, dy):
  x, w = res
  lhs, rest = eq.split(",")
  rhs, out = rest.split("->")
  if cpu.profile().grad_barrier(jax.default_backend()):
    dy = jax.lax.optimization_barrier(dy)
  dx = jnp.einsum(f"{out},{rhs}->{lhs}", dy, w).astype(x.dtype)
  dw = jnp.einsum(f"{lhs},{out}->{rhs}", x, dy).astype(w.dtype)
  return dx, dw


_einsum.defvjp(_einsum_fwd, _einsum_bwd)
