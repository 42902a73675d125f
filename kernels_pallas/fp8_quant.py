"""FP8 quantisers and the XLA reference GEMM for blockwise-scaled FP8 matmuls (DeepSeek-V3, §3.3).

A quantised operand is a pair (q, s): FP8 values and FP32 scales with x ~= q * s. Activations get one scale per
1x128 tile along K, weights one per 128x128 block, and per-tensor ("tensorwise") scaling one scale for all.
Every GEMM here takes its operands in one layout: lhs (q [M, K], s [M, K/128]) and rhs (q [K, N],
s [K/128, N]), a scale per (row, K tile) and per (K tile, column); weight blocks and tensor scales are broadcast
to it, so one GEMM serves every recipe and the backward pass.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

TILE = 128  # K-tile of the scales, and the FP32 promotion interval (DeepSeek-V3's N_C = 128).
E4M3 = jnp.float8_e4m3fn  # activations and weights (max 448)
E5M2 = jnp.float8_e5m2  # optional for gradients (max 57344, wider range, fewer mantissa bits)


def _scale(amax: jax.Array, dtype) -> jax.Array:
  """FP32 scale mapping amax to the FP8 maximum (margin 0); 1 for all-zero tiles (nothing to scale)."""
  amax = amax.astype(jnp.float32)
  return jnp.where(amax > 0, amax / float(jnp.finfo(dtype).max), 1.0)


def _cast(x: jax.Array, s: jax.Array, dtype) -> jax.Array:
  """x / s rounded to `dtype`, clipped first: e4m3fn has no inf and turns overflow into NaN."""
  fmax = float(jnp.finfo(dtype).max)
  return jnp.clip(x.astype(jnp.float32) / s, -fmax, fmax).astype(dtype)


def quantize_rows(x: jax.Array, dtype=E4M3) -> tuple[jax.Array, jax.Array]:
  """Per 1x128 tile along the last axis: x [M, K] -> (q [M, K], s [M, K/128])."""
  m, k = x.shape
  xt = x.reshape(m, k // TILE, TILE)
  s = _scale(jnp.max(jnp.abs(xt), axis=-1), dtype)
  return _cast(xt, s[..., None], dtype).reshape(m, k), s


def quantize_cols(x: jax.Array, dtype=E4M3) -> tuple[jax.Array, jax.Array]:
  """Per 128x1 tile along the first axis (an activation used as rhs): x [K, N] -> (q [K, N], s [K/128, N])."""
  q, s = quantize_rows(x.T, dtype)
  return q.T, s.T


def quantize_blocks(w: jax.Array, dtype=E4M3) -> tuple[jax.Array, jax.Array]:
  """Per 128x128 block: w [K, N] -> (q [K, N], s [K/128, N]), each block's scale repeated over its columns."""
  k, n = w.shape
  wb = w.reshape(k // TILE, TILE, n // TILE, TILE)
  s = _scale(jnp.max(jnp.abs(wb), axis=(1, 3)), dtype)
  q = _cast(wb, s[:, None, :, None], dtype).reshape(k, n)
  return q, jnp.repeat(s, TILE, axis=1)


def tensor_amax(x: jax.Array) -> jax.Array:
  """The per-tensor amax max |x| in FP32 (current scaling's, and what delayed scaling records)."""
  return jnp.max(jnp.abs(x)).astype(jnp.float32)


def quantize_tensor(x: jax.Array, dtype=E4M3, *, lhs: bool, amax: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array]:
  """One scale for the whole tensor, broadcast to the lhs ([M, K/128]) or rhs ([K/128, N]) scale layout; from
  x's own amax, or from a given `amax` (delayed scaling: elements beyond it saturate at the FP8 maximum; a given
  amax of 0, none recorded yet, stands for x's own)."""
  own = tensor_amax(x)
  s = _scale(own if amax is None else jnp.where(amax > 0, amax, own), dtype)
  m, n = x.shape
  shape = (m, n // TILE) if lhs else (m // TILE, n)
  return _cast(x, s, dtype), jnp.full(shape, s, jnp.float32)


def _truncate(x: jax.Array, mantissa_bits: int) -> jax.Array:
  """x with its f32 mantissa truncated (rounded toward zero) to `mantissa_bits`, as a narrow adder keeps it."""
  mask = jnp.uint32((0xFFFFFFFF << (23 - mantissa_bits)) & 0xFFFFFFFF)
  return lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.uint32) & mask, jnp.float32)


def gemm_xla(aq, sa, bq, sb, *, out_dtype=jnp.float32, mma_bits: int | None = None, promote: bool = True,
             mma_k: int = 32) -> jax.Array:
  """sum over K tiles t of (aq[:, t] @ bq[t, :]) * sa[:, t] * sb[t, :], accumulated in FP32: the kernels' math.

  With `mma_bits=None` each tile's product is an FP32 dot, as the Pallas kernels compute it. `mma_bits` models
  a tensor core's narrow accumulator instead (Hopper keeps ~14 bits, DeepSeek-V3 §3.3.2; 13 mantissa bits): the
  running sum is truncated after every `mma_k` elements of K (one FP8 MMA step). Then `promote=True` moves it to
  the FP32 accumulator every 128 elements (scaled there), and `promote=False` keeps all of K in the narrow sum.
  """
  m, k = aq.shape
  n = bq.shape[1]
  steps = 1 if mma_bits is None else TILE // mma_k
  a4 = aq.reshape(m, k // TILE, steps, TILE // steps).transpose(1, 2, 0, 3)
  b4 = bq.reshape(k // TILE, steps, TILE // steps, n)

  def body(t, carry):
    acc, narrow = carry
    scale = sa[:, t, None] * sb[t][None, :]
    for u in range(steps):
      part = lax.dot(a4[t, u], b4[t, u], preferred_element_type=jnp.float32)
      if mma_bits is None:
        acc = acc + part * scale
      elif promote:
        narrow = _truncate(narrow + part, mma_bits)
      else:
        narrow = _truncate(narrow + part * scale, mma_bits)
    if mma_bits is not None and promote:
      acc, narrow = acc + narrow * scale, jnp.zeros_like(narrow)
    return acc, narrow

  zeros = jnp.zeros((m, n), jnp.float32)
  acc, narrow = lax.fori_loop(0, k // TILE, body, (zeros, zeros))
  return (narrow if mma_bits is not None and not promote else acc).astype(out_dtype)
