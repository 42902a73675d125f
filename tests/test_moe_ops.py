"""MoE expert computation (jpllm_jax/moe/ops.py, kernels_pallas/moe_dispatch.py) against the dense reference:
forward and gradients of every implementation, uneven and empty groups, capacity dropping, the Pallas kernel
in interpret mode."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpllm_jax.moe import moe_ffn, moe_ffn_reference, ops
from kernels_pallas import moe_dispatch

D, F = 16, 32
IMPLS = ("ragged", "padded", "pallas")


def make_inputs(n: int, e: int, k: int, routing: str = "skewed", seed: int = 0):
  """Tokens, k distinct experts per token, gates and weights. "skewed" routing favours low expert ids and
  never picks the top quarter (empty experts); "balanced" gives every expert the same load; "one" sends every
  token to experts 0..k-1."""
  rng = np.random.default_rng(seed)
  if routing == "balanced":
    ids = (np.arange(n * k).reshape(n, k)) % e
  elif routing == "one":
    ids = np.broadcast_to(np.arange(k), (n, k))
  else:
    used = max(k, e - e // 4)
    p = np.exp(-3.0 * np.arange(used) / used)
    ids = np.stack([rng.choice(used, k, replace=False, p=p / p.sum()) for _ in range(n)])
  x = rng.normal(size=(n, D))
  gates = rng.random((n, k))
  w = [rng.normal(size=s) / math.sqrt(s[1]) for s in [(e, D, F), (e, D, F), (e, F, D)]]
  return [jnp.asarray(v, jnp.float32) for v in [x, ids, gates, *w]]


def assert_close(actual, expected, tol: float = 1e-5, msg: str = ""):
  """Equal within tol, relative to each element and to the largest magnitude (at least 1)."""
  expected = np.asarray(expected)
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=tol, atol=tol * max(1.0, np.abs(expected).max()),
                             err_msg=msg)


def check_against_reference(impl: str, inputs, capacity_factor=None, **kw):
  """Forward and VJP (wrt x, gates and the weights) of moe_ffn, under jit, against the reference."""
  x, ids, gates, wg, wu, wd = inputs
  ids = ids.astype(jnp.int32)
  ours = jax.jit(lambda x, g, *w: moe_ffn(x, ids, g, *w, impl=impl, capacity_factor=capacity_factor, **kw)[0])
  ref = lambda x, g, *w: moe_ffn_reference(x, ids, g, *w, capacity_factor=capacity_factor)
  args = (x, gates, wg, wu, wd)
  y, vjp = jax.vjp(ours, *args)
  y_ref, vjp_ref = jax.vjp(ref, *args)
  assert_close(y, y_ref)
  dy = jax.random.normal(jax.random.key(1), y.shape)
  for name, g, g_ref in zip(["x", "gates", "w_gate", "w_up", "w_down"], jax.jit(vjp)(dy), vjp_ref(dy)):
    assert_close(g, g_ref, msg=f"d{name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,e,k", [(24, 4, 1), (20, 8, 2), (16, 64, 8)])
def test_matches_reference(impl, n, e, k):
  check_against_reference(impl, make_inputs(n, e, k), block_rows=8)


@pytest.mark.parametrize("routing", ["balanced", "one"])
def test_padded_layouts(routing):
  """"padded" picks a padded layout when the groups fit and the block layout when one expert takes all."""
  check_against_reference("padded", make_inputs(24, 8, 2, routing=routing), block_rows=8)


def test_padded_layout_menu():
  """The benchmark's shape: C = 1.1, 1.125 and 1.25 x the mean group of 512 (rows in multiples of 8), then the
  block layout; a padded last layout where that holds every routing for little more than the block layout."""
  layouts, limits = ops._padded_layouts(4096 * 8, 64, None, 4096 * 8, 64)  # pylint: disable=protected-access
  assert limits == (568, 576, 640)
  assert layouts == (("padded", 568), ("padded", 576), ("padded", 640), ("blocked", 64))
  layouts, limits = ops._padded_layouts(64, 2, None, 64, 8)  # pylint: disable=protected-access
  assert layouts == (("padded", 40), ("blocked", 8)) and limits == (40,)
  layouts, limits = ops._padded_layouts(64, 1, None, 64, 8)  # pylint: disable=protected-access
  assert layouts == (("padded", 64),) and limits == ()
  layouts, limits = ops._padded_layouts(48, 8, 7, 48, 8)  # pylint: disable=protected-access
  assert layouts == (("padded", 8),) and limits == ()


@pytest.mark.parametrize("impl", IMPLS)
def test_capacity_dropping(impl):
  n, e, k, cf = 24, 8, 2, 1.0
  inputs = make_inputs(n, e, k, seed=3)
  x, ids, gates, wg, wu, wd = inputs
  ids = ids.astype(jnp.int32)
  cap = math.ceil(cf * n * k / e)
  ids_np = np.asarray(ids).reshape(-1)
  seen = np.zeros(e, int)
  keep = np.zeros(n * k, bool)
  for a, ex in enumerate(ids_np):  # first come, in token order
    keep[a] = seen[ex] < cap
    seen[ex] += 1
  load = np.bincount(ids_np, minlength=e)
  y, stats = jax.jit(functools.partial(moe_ffn, impl=impl, capacity_factor=cf, block_rows=8))(x, ids, gates, wg, wu,
                                                                                              wd)
  np.testing.assert_array_equal(stats["load"], load)
  assert int(stats["dropped"]) == np.maximum(load - cap, 0).sum() == (~keep).sum() > 0
  # Dropped assignments contribute nothing: the same as dropless with their gates zeroed.
  assert_close(y, moe_ffn_reference(x, ids, gates * keep.reshape(n, k), wg, wu, wd))
  check_against_reference(impl, inputs, capacity_factor=cf, block_rows=8)


def test_dropless_stats():
  x, ids, gates, wg, wu, wd = make_inputs(20, 8, 2)
  _, stats = moe_ffn(x, ids.astype(jnp.int32), gates, wg, wu, wd, impl="padded")
  np.testing.assert_array_equal(stats["load"], np.bincount(np.asarray(ids, int).ravel(), minlength=8))
  assert int(stats["dropped"]) == 0


def test_pallas_grouped_matmul():
  """The kernel alone, in interpret mode: blocks of 8 rows for experts [0, 0, 2, E(unused)] of E = 3, against
  per-block matmuls; its VJP against the VJP of the same."""
  e, bm = 3, 8
  block_expert = jnp.array([0, 0, 2, e], jnp.int32)
  offsets = jnp.array([0, 2, 2, 3], jnp.int32)
  lhs = jax.random.normal(jax.random.key(0), (4 * bm, D))
  rhs = jax.random.normal(jax.random.key(1), (e, D, F))

  def ref(lhs, rhs):
    w = jnp.concatenate([rhs, jnp.zeros((1, D, F))])[block_expert]
    return jnp.einsum("bmk,bkn->bmn", lhs.reshape(4, bm, D), w).reshape(4 * bm, F)

  ours = lambda lhs, rhs: moe_dispatch.grouped_matmul(lhs, rhs, block_expert, offsets, bm, True)
  out, vjp = jax.vjp(ours, lhs, rhs)
  out_ref, vjp_ref = jax.vjp(ref, lhs, rhs)
  assert_close(out, out_ref)
  dout = jax.random.normal(jax.random.key(2), out.shape)
  for g, g_ref in zip(vjp(dout), vjp_ref(dout)):
    assert_close(g, g_ref)


def test_auto_and_errors():
  assert ops.default_impl() == {"cpu": "padded", "gpu": "pallas"}.get(jax.default_backend(), "ragged")
  x, ids, gates, wg, wu, wd = make_inputs(8, 4, 2)
  with pytest.raises(ValueError):
    moe_ffn(x, ids.astype(jnp.int32), gates, wg, wu, wd, impl="nope")
