"""The MoE grouped matmul's TPU (Mosaic) design, kernels_pallas/moe_gmm_tpu.py: in the interpreter against per-block
matmuls (forward and VJP, f32 and bf16), and compiled deviceless for v5p:2x2x1 with
libtpu (in a subprocess, so this process keeps JAX_PLATFORMS=cpu and never loads libtpu)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import moe_dispatch, moe_gmm_tpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E, D, F = 3, 64, 256


def _layout(bm: int):
  """Blocks of experts [0, 0, 2, E (past the groups)]: expert 1 has none."""
  return jnp.array([0, 0, 2, E], jnp.int32), jnp.array([0, 2, 2, 3], jnp.int32), 4 * bm


def _reference(lhs, rhs, block_expert, bm):
  w = jnp.concatenate([rhs, jnp.zeros((1, *rhs.shape[1:]), rhs.dtype)])[block_expert]
  nb = block_expert.shape[0]
  out = jnp.einsum("bmk,bkn->bmn", lhs.reshape(nb, bm, -1).astype(jnp.float32), w.astype(jnp.float32))
  return out.reshape(nb * bm, -1)


@pytest.mark.parametrize("dtype,bm", [(jnp.float32, 8), (jnp.bfloat16, 8)])  # bf16 x 8 rows: streamed as f32
def test_mosaic_design_in_interpreter(dtype, bm):
  block_expert, offsets, m = _layout(bm)
  lhs = jax.random.normal(jax.random.key(0), (m, D)).astype(dtype)
  rhs = jax.random.normal(jax.random.key(1), (E, D, F)).astype(dtype)
  ours = lambda lhs, rhs: moe_dispatch.grouped_matmul(lhs, rhs, block_expert, offsets, bm, True, "mosaic")
  ref = lambda lhs, rhs: _reference(lhs, rhs, block_expert, bm).astype(dtype)
  out, vjp = jax.vjp(ours, lhs, rhs)
  out_ref, vjp_ref = jax.vjp(ref, lhs, rhs)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  assert out.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(out_ref, np.float32), rtol=tol, atol=tol * 8)
  dout = jax.random.normal(jax.random.key(2), out.shape).astype(dtype)
  for g, g_ref in zip(vjp(dout), vjp_ref(dout)):
    scale = float(jnp.abs(g_ref.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), atol=tol * scale)
  dw = vjp(dout)[1]
  assert not np.any(np.asarray(dw[1], np.float32))  # expert 1 has no blocks: zero dW, not stale memory


def test_tiles():
  assert [moe_gmm_tpu.lane_tile(d) for d in (4096, 14336, 384, 64, 200)] == [512, 512, 128, 64, 200]
  assert moe_gmm_tpu.tiled_dtype(8, jnp.bfloat16) == jnp.float32 and moe_gmm_tpu.tiled_dtype(16, jnp.bfloat16) == \
      jnp.bfloat16
  with pytest.raises(ValueError, match="multiple of 8"):
    moe_gmm_tpu.tiled_dtype(4, jnp.float32)


SCRIPT = r"""
import json, jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding
from jpllm_jax.moe import moe_ffn
from jpllm_jax.moe.ops import block_tables
from kernels_pallas import moe_dispatch
dev = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices[0]
s = SingleDeviceSharding(dev)
E, K, N, bm, rows = 8, 1024, 768, 128, 4096
M = (rows + E * (bm - 1)) // bm * bm
def gmm_loss(x, w, sizes):
  _, _, be, off = block_tables(sizes, bm, rows)
  return jnp.sum(moe_dispatch.grouped_matmul(x, w, be, off, bm).astype(jnp.float32) ** 2)
sds = jax.ShapeDtypeStruct
lo = jax.jit(jax.grad(gmm_loss, argnums=(0, 1)), in_shardings=(s, s, s)).lower(
    sds((M, K), jnp.bfloat16), sds((E, K, N), jnp.bfloat16), sds((E,), jnp.int32))
c = lo.compile()
out = {"gmm_calls": lo.as_text().count("tpu_custom_call"), "gmm_flops": c.cost_analysis()["flops"], "M": M}
n, k, D, F = 2048, 2, 512, 1024
def ffn_loss(impl, x, ids, gates, wg, wu, wd):
  return jnp.sum(moe_ffn(x, ids, gates, wg, wu, wd, impl=impl, block_rows=bm)[0].astype(jnp.float32) ** 2)
args = (sds((n, D), jnp.bfloat16), sds((n, k), jnp.int32), sds((n, k), jnp.float32),
        sds((E, D, F), jnp.bfloat16), sds((E, D, F), jnp.bfloat16), sds((E, F, D), jnp.bfloat16))
for impl in ("pallas", "ragged"):
  f = jax.jit(jax.grad(lambda *a: ffn_loss(impl, *a), argnums=(0, 3, 4, 5)), in_shardings=(s,) * 6)
  lo = f.lower(*args)
  c = lo.compile()
  m = c.memory_analysis()
  out[impl] = {"calls": lo.as_text().count("tpu_custom_call"), "flops": c.cost_analysis()["flops"],
               "bytes": c.cost_analysis()["bytes accessed"], "temp": m.temp_size_in_bytes}
print("RESULT", json.dumps(out))
"""


def compile_deviceless(script: str) -> dict:
  """Runs `script` in a subprocess that sees libtpu's deviceless TPU (JAX_PLATFORMS unset) and returns the JSON it
  prints on its "RESULT " line."""
  env = dict(os.environ, JAX_PLATFORMS="", PYTHONPATH=REPO, ALLOW_MULTIPLE_LIBTPU_LOAD="1",
             TPU_WORKER_HOSTNAMES="localhost", TPU_ACCELERATOR_TYPE="v5p-8")  # no TPU host probing
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  r = next(json.loads(l.split(" ", 1)[1]) for l in proc.stdout.splitlines() if l.startswith("RESULT"))
  print(r)
  return r


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (requirements.txt pins it)")
def test_compiles_for_v5p():
  """grouped_matmul's forward and VJP lower to three Mosaic kernels on a deviceless v5p ("auto" picks them by the
  lowering platform) whose FLOPs the cost analysis counts; moe_ffn impl="pallas" compiles with them, "ragged"
  without."""
  r = compile_deviceless(SCRIPT)
  assert r["gmm_calls"] == 3  # gmm forward, gmm of dout with rhs^T, tgmm
  assert r["gmm_flops"] >= 3 * 2 * r["M"] * 1024 * 768
  assert r["pallas"]["calls"] >= 3 and r["ragged"]["calls"] == 0
  assert r["pallas"]["flops"] > 0 and r["ragged"]["flops"] > 0
