"""The MoE dispatch/combine row-DMA kernels (kernels_pallas/moe_permute.py): the Mosaic design in Pallas's TPU
interpreter against jnp.take and ops.combine, moe_ffn's "pallas" layout with them against "ragged", and a deviceless
v5p compile of the moe_ffn gradient that holds them (in a subprocess: tests/test_moe_tpu_kernels.py)."""
from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_moe_ops import make_inputs
from test_moe_tpu_kernels import compile_deviceless

from jpllm_jax.moe import moe_ffn, ops
from kernels_pallas import moe_permute


def _rows_and_indices(t: int, d: int, r: int, dtype, seed: int = 0):
  """x [t, d] and indices [r] into it with out-of-range ones (t: an empty row, t + 3, -1) and repeats."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32).astype(dtype)
  idx = rng.integers(0, t, r)
  idx[rng.random(r) < 0.2] = t
  idx[:3] = [t + 3, -1, idx[3]]
  return x, jnp.asarray(idx, jnp.int32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("t,d,r,block", [(37, 128, 45, None), (64, 256, 100, 16), (5, 200, 7, None)])
def test_gather_rows_equals_take(dtype, t, d, r, block):
  """Row moves are exact in both dtypes; rows past the source (and negative ones) are zero, also for R not a
  multiple of the block and D not a multiple of 128 (padded)."""
  x, idx = _rows_and_indices(t, d, r, dtype)
  out = jax.jit(lambda x, i: moe_permute.gather_rows(x, i, block_rows=block, interpret=True))(x, idx)
  ref = jnp.take(x, jnp.where(idx < 0, t, idx), axis=0, mode="fill", fill_value=0)
  assert out.dtype == dtype and out.shape == (r, d)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
  np.testing.assert_array_equal(np.asarray(moe_permute.gather_rows(x, idx, backend="xla"), np.float32),
                                np.asarray(ref, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("k,d,n,weighted", [(1, 128, 21, True), (2, 256, 37, True), (6, 128, 19, True),
                                            (2, 128, 30, False)])
def test_gather_combine_equals_ops_combine(dtype, k, d, n, weighted):
  """Against ops.combine (dropped assignments: index = the row count): f32 equal up to summation order, bf16
  within one bf16 rounding of the f32-accumulated sum (ops.combine multiplies and sums in bf16)."""
  rows, row_of = _rows_and_indices(3 * n, d, n * k, dtype, seed=k)
  row_of = jnp.where((row_of < 0) | (row_of > rows.shape[0]), rows.shape[0], row_of)  # (combine's own convention)
  w = jnp.asarray(np.random.default_rng(1).random(n * k), jnp.float32) if weighted else None
  out = jax.jit(lambda r, i, w: moe_permute.gather_combine(r, i, w, k=k, interpret=True))(rows, row_of, w)
  ref32 = ops.combine(rows.astype(jnp.float32), row_of, n, w)
  assert out.dtype == dtype and out.shape == (n, d)
  tol = 1e-6 if dtype == jnp.float32 else 2 ** -8
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref32), rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ops.combine(rows, row_of, n, w), np.float32),
                             rtol=4 * tol, atol=4 * tol)
  xla = moe_permute.gather_combine(rows, row_of.reshape(n, k), None if w is None else w.reshape(n, k), backend="xla")
  np.testing.assert_allclose(np.asarray(xla, np.float32), np.asarray(out, np.float32), rtol=tol, atol=tol)


def test_errors_say_what_to_change():
  x, idx = _rows_and_indices(8, 128, 8, jnp.float32)
  with pytest.raises(ValueError, match="float32 or bfloat16"):
    moe_permute.gather_rows(x.astype(jnp.float16), idx, interpret=True)
  with pytest.raises(ValueError, match="give k"):
    moe_permute.gather_combine(x, idx)
  with pytest.raises(ValueError, match="backend must be one of"):
    moe_permute.gather_rows(x, idx, backend="cuda")


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_moe_ffn_pallas_with_mosaic_permutes_equals_ragged(capacity_factor):
  """Forward and gradients of impl="pallas" with every gather and combine in the interpreted Mosaic kernels
  (interpret=True) against impl="ragged" (XLA's gathers and ragged_dot)."""
  x, ids, gates, wg, wu, wd = make_inputs(24, 8, 2, seed=3)
  ids = ids.astype(jnp.int32)

  def loss(impl, **kw):
    def f(x, g, *w):
      y = moe_ffn(x, ids, g, *w, impl=impl, capacity_factor=capacity_factor, block_rows=8, **kw)[0]
      return jnp.sum(y * jnp.cos(y)), y
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))(x, gates, wg, wu, wd)

  (_, y), grads = loss("pallas", interpret=True, permute="mosaic")
  (_, y_ref), grads_ref = loss("ragged")
  scale = lambda a: 1e-5 * max(1.0, float(np.abs(a).max()))
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=scale(y_ref), rtol=1e-5)
  for name, g, g_ref in zip(["x", "gates", "w_gate", "w_up", "w_down"], grads, grads_ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=scale(g_ref), rtol=1e-5, err_msg=name)


SCRIPT = r"""
import json, jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding
from jpllm_jax.moe import moe_ffn
s = SingleDeviceSharding(topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices[0])
sds = jax.ShapeDtypeStruct
n, k, E, D, F, bm = 2048, 2, 8, 512, 1024, 128
args = (sds((n, D), jnp.bfloat16), sds((n, k), jnp.int32), sds((n, k), jnp.float32),
        sds((E, D, F), jnp.bfloat16), sds((E, D, F), jnp.bfloat16), sds((E, F, D), jnp.bfloat16))
out = {}
for name, kw in [("pallas", dict(impl="pallas")), ("pallas_xla_permute", dict(impl="pallas", permute="xla")),
                 ("ragged", dict(impl="ragged"))]:
  def loss(x, ids, gates, wg, wu, wd, kw=kw):
    return jnp.sum(moe_ffn(x, ids, gates, wg, wu, wd, block_rows=bm, **kw)[0].astype(jnp.float32) ** 2)
  lo = jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4, 5)), in_shardings=(s,) * 6).lower(*args)
  c = lo.compile()
  text, cost, mem = lo.as_text(), c.cost_analysis(), c.memory_analysis()
  out[name] = {"gather_rows": text.count("moe_gather_rows"), "gather_combine": text.count("moe_gather_combine"),
               "mosaic_calls": text.count("tpu_custom_call"), "temp_bytes": mem.temp_size_in_bytes,
               "bytes_accessed": cost["bytes accessed"], "flops": cost["flops"]}
print("RESULT", json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (requirements.txt pins it)")
def test_moe_ffn_grad_compiles_for_v5p_with_the_permute_kernels():
  """impl="pallas" lowers its gathers and combines to the Mosaic kernels when compiled for v5p ("auto" picks them
  by the lowering platform); permute="xla" and "ragged" have none. Prints the compiled temporaries and bytes."""
  r = compile_deviceless(SCRIPT)
  for name, v in r.items():
    print(f"{name:20s} temp {v['temp_bytes'] / 2**20:8.1f} MiB  bytes accessed {v['bytes_accessed'] / 2**20:8.1f} MiB")
  # forward: x -> rows, g/u -> assignment order (2), y combine; backward: x, dy, g, u -> rows (4), dx combine.
  assert r["pallas"]["gather_rows"] >= 7 and r["pallas"]["gather_combine"] >= 2
  assert r["pallas_xla_permute"]["gather_rows"] == r["pallas_xla_permute"]["gather_combine"] == 0
  assert r["ragged"]["mosaic_calls"] == 0
