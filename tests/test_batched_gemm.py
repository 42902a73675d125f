"""Batched GEMMs for irregular shapes (jpllm_jax/batched_gemm.py) against one jnp product per GEMM."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpllm_jax import batched_gemm as bg

HI = jax.lax.Precision.HIGHEST


def _rand(key, *shape):
  return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def test_plan_pads_k_and_n_to_the_vector_and_bounds_the_waste():
  shapes = [(37, 144, 50), (40, 144, 50), (8, 20, 9), (300, 864, 144), (290, 864, 144), (5, 7, 3)]
  p = bg.plan(shapes, multiple=16, max_waste=0.15)
  assert sorted(i for b in p.buckets for i in b.members) == list(range(len(shapes)))
  for b in p.buckets:
    m, k, n = b.shape
    assert k % 16 == 0 and n % 16 == 0
    assert all(shapes[i][0] <= m and shapes[i][1] <= k and shapes[i][2] <= n for i in b.members)
    if len(b.members) > 1:
      rounded = [(m, -(-k // 16) * 16, -(-n // 16) * 16) for m, k, n in shapes]
      assert bg._bucket_waste(rounded, list(b.members), b.shape) <= 0.15
  assert {(0, 1), (3, 4)} <= {b.members for b in p.buckets}
  assert p.report()["buckets"] == len(p.buckets) and 0 < p.waste < 1
  # Shapes already whole vectors and equal: one bucket, no waste.
  same = bg.plan([(64, 144, 64)] * 6, multiple=16)
  assert len(same.buckets) == 1 and same.waste == 0.0
  # A looser bound makes fewer buckets.
  assert len(bg.plan(shapes, 16, max_waste=0.9).buckets) < len(p.buckets)


def test_plan_defaults_to_the_profile_lanes(monkeypatch):
  from jpllm_jax import cpu
  for name, want in (("a64fx", (3, 16, 16)), ("x86-avx2", (3, 8, 8)), ("aarch64-neon", (3, 8, 8))):
    monkeypatch.setenv(cpu.PROFILE_ENV, name)
    cpu.profile.cache_clear()
    assert bg.plan([(3, 5, 7)]).buckets[0].shape == want
  monkeypatch.delenv(cpu.PROFILE_ENV)
  cpu.profile.cache_clear()


def test_matmuls_equal_per_gemm_products():
  shapes = [(37, 144, 50), (40, 144, 50), (8, 20, 9), (33, 100, 144), (30, 100, 140), (1, 1, 1), (0, 4, 3)]
  lhs = [_rand(i, m, k) for i, (m, k, _) in enumerate(shapes)]
  rhs = [_rand(100 + i, k, n) for i, (_, k, n) in enumerate(shapes)]
  got = jax.jit(bg.matmuls)(lhs, rhs)
  for a, b, c in zip(lhs, rhs, got):
    np.testing.assert_allclose(c, jnp.matmul(a, b, precision=HI), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="plan is for"):
    bg.matmuls(lhs[:2], rhs[:2], bg.plan(shapes[:1]))


def test_grouped_matmul_equals_ragged_dot():
  sizes = (37, 91, 0, 130, 64, 17, 5, 9)
  x, w = _rand(0, sum(sizes), 72), _rand(1, len(sizes), 72, 100)
  got = jax.jit(bg.grouped_matmul, static_argnums=2)(x, w, sizes)
  want = jax.lax.ragged_dot(x, w, jnp.asarray(sizes, jnp.int32), precision=HI)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert bg.grouped_plan(sizes, 72, 100, multiple=16).waste <= 0.5
  with pytest.raises(ValueError, match="do not split"):
    bg.grouped_matmul(x, w, sizes[:-1])


def test_gradients_flow_through_the_padding():
  sizes = (5, 11, 3)
  x, w = _rand(2, sum(sizes), 24), _rand(3, 3, 24, 18)
  f = lambda x, w: jnp.sum(jnp.sin(bg.grouped_matmul(x, w, sizes)))
  g = lambda x, w: jnp.sum(jnp.sin(jax.lax.ragged_dot(x, w, jnp.asarray(sizes), precision=HI)))
  for a, b in zip(jax.grad(f, (0, 1))(x, w), jax.grad(g, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bucket_kernel_is_the_profiles_where_it_loads(monkeypatch):
  """The profile asks for the SVE kernel on SVE machines; on this (non-aarch64) host it cannot load, so the
  buckets fall back to XLA's dot, and asking for it explicitly says why. The kernel itself is checked under
  emulation (tests/test_a64fx_emulation.py)."""
  import platform
  from jpllm_jax import cpu, kernels_sve
  if platform.machine() in ("aarch64", "arm64"):
    pytest.skip("on aarch64 the kernel may load here")
  assert cpu.PRESETS["a64fx"].gemm_kernel == "sve" and cpu.PRESETS["aarch64-sve"].gemm_kernel == "sve"
  assert cpu.PRESETS["x86-avx512"].gemm_kernel == "xla" and cpu.PRESETS["aarch64-neon"].gemm_kernel == "xla"
  monkeypatch.setenv(cpu.PROFILE_ENV, "a64fx")
  cpu.profile.cache_clear()
  try:
    assert not kernels_sve.available() and "aarch64" in kernels_sve.unavailable_reason()
    assert bg.gemm_backend() == "xla"
    a, b = _rand(0, 5, 7), _rand(1, 7, 3)
    np.testing.assert_array_equal(bg.matmuls([a], [b])[0], bg.matmuls([a], [b], backend="xla")[0])
    with pytest.raises(RuntimeError, match="unavailable"):
      bg.matmuls([a], [b], backend="sve")
    with pytest.raises(ValueError, match="not one of"):
      bg.matmuls([a], [b], backend="blas")
  finally:
    monkeypatch.delenv(cpu.PROFILE_ENV)
    cpu.profile.cache_clear()
