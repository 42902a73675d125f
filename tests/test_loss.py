"""The fused, chunked head + cross-entropy equals the plain one (loss, metrics and gradients)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpllm_jax.models.loss import cross_entropy, fused_cross_entropy


def _inputs(b=3, t=37, d=16, v=101, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k[0], (b, t, d))
  w = jax.random.normal(k[1], (d, v)) * 0.5
  targets = jax.random.randint(k[2], (b, t), 0, v)
  weights = (jax.random.uniform(k[3], (b, t)) > 0.2).astype(jnp.float32)  # padding and masked targets
  return x, w, targets, weights


@pytest.mark.parametrize("layout", ["dv", "vd"])
@pytest.mark.parametrize("chunk_tokens", [1, 12, 48, 10_000])  # T = 37 is not a multiple of the chunk.
def test_fused_matches_plain_loss_and_gradients(layout, chunk_tokens):
  x, w, targets, weights = _inputs()
  if layout == "vd":
    w = w.T  # a tied embedding table [V, D]

  def plain(x, w):
    return cross_entropy(jnp.einsum(f"btd,{layout}->btv", x, w), targets, weights, z_loss=1e-2)

  def fused(x, w):
    return fused_cross_entropy(x, w, layout, targets, weights, z_loss=1e-2, chunk_tokens=chunk_tokens)

  (want, want_m), want_g = jax.value_and_grad(plain, argnums=(0, 1), has_aux=True)(x, w)
  (got, got_m), got_g = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(x, w)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for k in ("ce", "z_loss", "tokens"):
    np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-6)
  for g, h in zip(got_g, want_g):
    np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-7)
  # The forward-only path (evaluation) gives the same numbers.
  np.testing.assert_allclose(jax.jit(fused)(x, w)[0], want, rtol=1e-6)


def test_fused_gradient_scales_with_the_cotangent():
  x, w, targets, weights = _inputs(seed=1)
  f = lambda x: 3.0 * fused_cross_entropy(x, w, "dv", targets, weights, chunk_tokens=16)[0]
  g = lambda x: 3.0 * cross_entropy(jnp.einsum("btd,dv->btv", x, w), targets, weights)[0]
  np.testing.assert_allclose(jax.grad(f)(x), jax.grad(g)(x), rtol=1e-5, atol=1e-7)


def test_fused_bfloat16_is_close_to_float32():
  x, w, targets, weights = _inputs(seed=2)
  f = lambda x, w: fused_cross_entropy(x, w, "dv", targets, weights, chunk_tokens=16)[0]
  want = jax.grad(f, argnums=(0, 1))(x, w)
  got = jax.grad(f, argnums=(0, 1))(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.bfloat16
  for g, h in zip(got, want):
    assert float(jnp.linalg.norm(g.astype(jnp.float32) - h) / jnp.linalg.norm(h)) < 2e-2
