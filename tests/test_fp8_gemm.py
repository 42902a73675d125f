"""Blockwise FP8 GEMM: quantisers, the Pallas kernels (interpreted) against the XLA fallback, the FP8 VJP,
padding, and the numerics claims (error vs FP32, outliers, FP32 promotion)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import fp8_quant as fq
from kernels_pallas.fp8_gemm import E5M2, fp8_gemm, fp8_matmul, quantize_operands


def _inputs(m, k, n, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (m, k), jnp.float32), 0.02 * jax.random.normal(kw, (k, n), jnp.float32)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _token_rel(a, b) -> float:
  """Mean over rows (tokens) of the per-row relative error: outlier rows cannot hide the others'."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.mean(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)))


def _ref(x, w):
  return np.asarray(x, np.float64) @ np.asarray(w, np.float64)


def test_quantizers_scales_and_layouts():
  x, w = _inputs(128, 256, 256)
  x = x.at[3, :128].set(0.0)  # an all-zero tile gets scale 1 and zeros
  q, s = fq.quantize_rows(x)
  assert q.dtype == jnp.float8_e4m3fn and s.shape == (128, 2) and s[3, 0] == 1.0
  tile_amax = np.abs(np.asarray(x)).reshape(128, 2, 128).max(-1)
  np.testing.assert_allclose(np.where(tile_amax > 0, tile_amax / 448.0, 1.0), s, rtol=1e-6)
  recon = np.asarray(q, np.float32).reshape(128, 2, 128) * np.asarray(s)[..., None]
  # E4M3 keeps 3 mantissa bits: normal values round within 2^-4 relative; small ones within the subnormal step.
  err = np.abs(recon.reshape(128, 256) - np.asarray(x))
  assert np.all(err <= np.abs(np.asarray(x)) * 2.0 ** -4 + np.repeat(np.asarray(s), 128, 1) * 2.0 ** -10)
  qb, sb = fq.quantize_blocks(w)
  assert sb.shape == (2, 256) and np.all(np.asarray(sb)[:, :128] == np.asarray(sb)[:, :1])
  block_amax = np.abs(np.asarray(w)).reshape(2, 128, 2, 128).max(axis=(1, 3))
  np.testing.assert_allclose(np.repeat(block_amax / 448.0, 128, 1), sb, rtol=1e-6)
  qc, sc = fq.quantize_cols(w, E5M2)
  assert qc.dtype == jnp.float8_e5m2 and sc.shape == (2, 256)
  np.testing.assert_allclose(np.abs(np.asarray(w)).reshape(2, 128, 256).max(1) / 57344.0, sc, rtol=1e-6)


@pytest.mark.parametrize("scaling", ["blockwise", "tensorwise"])
def test_interpreted_kernels_match_xla_fallback(scaling):
  """Same arithmetic in all three backends; only the FP32 summation order inside a tile's dot may differ."""
  x, w = _inputs(256, 384, 256)
  y = {b: np.asarray(fp8_matmul(x, w, scaling=scaling, backend=b, interpret=b != "xla"))
       for b in ("xla", "triton", "mosaic")}
  tol = 1e-6 * np.abs(y["xla"]).max()
  for b in ("triton", "mosaic"):
    np.testing.assert_allclose(y[b], y["xla"], rtol=0, atol=tol)
  assert 0.01 < _rel(y["xla"], _ref(x, w)) < 0.06  # E4M3's 3 mantissa bits: ~4% relative error


def test_gradients_are_fp8_gemms():
  x, w = _inputs(256, 256, 384, seed=1)
  dy = jax.random.normal(jax.random.key(2), (256, 384), jnp.float32)
  _, vjp = jax.vjp(lambda x, w: fp8_matmul(x, w), x, w)
  dx, dw = vjp(dy)
  # dgrad: dy per 1x128 tile along N, w^T per block; wgrad: x^T and dy per 128-tile along M.
  np.testing.assert_array_equal(dx, fp8_gemm(*quantize_operands(dy, w.T, scaling="blockwise")))
  np.testing.assert_array_equal(
      dw, fp8_gemm(*quantize_operands(x.T, dy, scaling="blockwise", b_is_weight=False)))
  assert _rel(dx, _ref(dy, w.T)) < 0.06 and _rel(dw, _ref(x.T, dy)) < 0.06
  _, vjp5 = jax.vjp(lambda x, w: fp8_matmul(x, w, grad_dtype=E5M2), x, w)
  dx5, dw5 = vjp5(dy)  # E5M2: 2 mantissa bits, so about twice E4M3's error
  assert _rel(dx, _ref(dy, w.T)) < _rel(dx5, _ref(dy, w.T)) < 0.12 and _rel(dw5, _ref(x.T, dy)) < 0.12


def test_interpreted_kernel_gradients_match_xla():
  x, w = _inputs(256, 256, 256, seed=3)
  loss = lambda backend, interpret: lambda x, w: jnp.sum(  # noqa: E731
      fp8_matmul(x, w, backend=backend, interpret=interpret) ** 2)
  gx = jax.grad(loss("xla", False), argnums=(0, 1))(x, w)
  gm = jax.grad(loss("mosaic", True), argnums=(0, 1))(x, w)
  for a, b in zip(gm, gx):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(np.asarray(b)).max())


def test_given_amaxes_scale_like_tensorwise_and_saturate():
  """Delayed scaling's GEMMs (`amax=`): at the operands' own amaxes (or 0: none recorded) they are the tensorwise
  GEMMs, forward, dgrad and wgrad; at a smaller amax the values beyond it saturate at 448 (x clipped to it)."""
  x, w = _inputs(128, 256, 256, seed=7)
  dy = jax.random.normal(jax.random.key(8), (128, 256), jnp.float32)
  amax = lambda a: jnp.max(jnp.abs(a))  # noqa: E731

  @jax.jit
  def run(x, w, dy, amaxes):
    y, vjp = jax.vjp(lambda x, w: fp8_matmul(x, w, scaling="tensorwise", amax=amaxes), x, w)
    return y, *vjp(dy)

  current = run(x, w, dy, None)
  for given in ((amax(x), amax(w), amax(dy)), (np.float32(0),) * 3):  # (one compile: no weak types)
    for a, b in zip(run(x, w, dy, given), current):
      np.testing.assert_array_equal(a, b)
  half = amax(x) / 2
  clipped = jnp.clip(x, -half, half)
  np.testing.assert_array_equal(run(x, w, dy, (half, amax(w), amax(dy)))[0], run(clipped, w, dy, None)[0])
  q, _ = fq.quantize_tensor(x, lhs=True, amax=half)
  beyond = np.abs(np.asarray(x)) >= half
  assert beyond.sum() > 100 and np.all(np.abs(np.asarray(q, np.float32))[beyond] == 448.0)
  with pytest.raises(ValueError, match="amax needs scaling='tensorwise'"):
    fp8_matmul(x, w, amax=(1.0, 1.0, 1.0))


def test_padding_dtypes_and_errors():
  x, w = _inputs(200, 300, 130, seed=4)
  y = fp8_matmul(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert y.shape == (200, 130) and y.dtype == jnp.bfloat16
  yp = fp8_matmul(jnp.pad(x, ((0, 56), (0, 84))), jnp.pad(w, ((0, 84), (0, 126))), out_dtype=jnp.float32)
  np.testing.assert_array_equal(fp8_matmul(x, w, out_dtype=jnp.float32), yp[:200, :130])
  dx, dw = jax.grad(lambda x, w: jnp.sum(fp8_matmul(x, w)), argnums=(0, 1))(x, w)
  assert dx.shape == x.shape and dw.shape == w.shape and dx.dtype == x.dtype
  with pytest.raises(ValueError, match="scaling must be"):
    fp8_matmul(x, w, scaling="rowwise")
  with pytest.raises(ValueError, match="backend must be"):
    fp8_matmul(x, w, backend="cuda")
  with pytest.raises(ValueError, match=r"x \[M, K\] and w \[K, N\]"):
    fp8_matmul(x, w.T)


def test_blockwise_beats_tensorwise_with_token_outliers():
  """Outlier tokens set the one tensor scale, pushing ordinary tokens into E4M3's subnormals; 1x128 tiles keep
  each token's own scale."""
  x, w = _inputs(256, 1024, 128, seed=5)
  x = x.at[::32].multiply(1e5)
  ref = _ref(x, w)
  block = _token_rel(fp8_matmul(x, w, scaling="blockwise"), ref)
  tensor = _token_rel(fp8_matmul(x, w, scaling="tensorwise"), ref)
  assert block < 0.06 and tensor > 3 * block, (block, tensor)


def test_fp32_promotion_bounds_narrow_accumulation():
  """With a ~14-bit accumulator (Hopper's, DeepSeek-V3 §3.3.2) the error grows with K unless partial sums are
  promoted to FP32 every 128 elements."""
  x, w = _inputs(128, 4096, 128, seed=6)
  ops = quantize_operands(jnp.abs(x), jnp.abs(w), scaling="blockwise")  # positive sums: truncation accumulates
  exact = fq.gemm_xla(*ops)
  promoted = _rel(fq.gemm_xla(*ops, mma_bits=13, promote=True), exact)
  narrow = _rel(fq.gemm_xla(*ops, mma_bits=13, promote=False), exact)
  assert promoted < 1e-3 < narrow, (promoted, narrow)
