r"""The MoE dispatch/combine kernels (kernels_pallas/moe_permute.py) against XLA's gathers, compiled deviceless for
one v5p chip (v5p:2x2x1 with libtpu on a CPU host): compiled figures, not timings (no TPU here).

For one MoE expert layer at a single-chip training shape (default 8192 tokens, top-2 of 8 experts, d_model 4096,
expert FFN 14336, bf16) it compiles the value-and-gradient (wrt x, gates and the three expert weights) of
`jpllm_jax.moe.moe_ffn` three ways:

  ragged              XLA's gathers and `lax.ragged_dot`
  pallas_xla_permute  the Pallas GMM (Mosaic) with XLA's gathers and combines (permute="xla")
  pallas              the Pallas GMM with the Mosaic row-DMA gathers and combines (permute="auto")

and, alone, the token -> row permutation (x [N, D] to the [A, D] expert-sorted rows) and the combine ([A, D] rows
to [N, D], gate-weighted), XLA's (moe_permute's XLA path, f32 products; and ops.combine, products in the rows'
dtype, which the other layouts use) against the kernel's. Each prints XLA's compiled temporaries
(`memory_analysis().temp_size_in_bytes`), bytes accessed and FLOPs (`cost_analysis()`, which counts a Pallas
kernel by its `pl.CostEstimate`), one JSON line per program and a final JSON line with the ratios of "pallas" to
"pallas_xla_permute".

  python benchmarks/moe_permute_tpu.py [--tokens 8192] [--experts 8] [--top-k 2] [--d-model 4096] [--d-ff 14336]
                                       [--dtype bfloat16|float32]

Results, 2026-12-03, libtpu deviceless v5p, default shape (compiled figures; XLA's cost analysis counts a Pallas
call by its CostEstimate, and the Mosaic GMM's estimate, which counts its row operand once per N tile, dominates the
layer's bytes; it counts ragged_dot's FLOPs as over all experts):
  bf16  moe_ffn grad temps: ragged 2627, pallas_xla_permute 867, pallas 1037 MiB; bytes accessed 48.8 / 338.8 /
        323.7 GB. Alone: permute 1408 (XLA) vs 384 MiB (Mosaic, of which the bf16 word view of x is 64 MiB of
        temporaries), combine 1625 (XLA; ops.combine 1615) vs 473 MiB, combine temps 256 vs 128 MiB.
  f32   moe_ffn grad temps 3467 / 1722 / 1715 MiB; bytes 95.5 / 674.4 / 635.5 GB. Alone: permute 2816 vs 512 MiB,
        combine 3225 vs 417 MiB, combine temps 512 vs 2 MiB (XLA materialises the picked [N, k, D] rows; the
        kernel does not).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.update(JAX_PLATFORMS="", ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_WORKER_HOSTNAMES="localhost",
                  TPU_ACCELERATOR_TYPE="v5p-8")  # libtpu's deviceless TPU, without host probing

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from jpllm_jax.moe import moe_ffn, ops  # noqa: E402
from kernels_pallas import moe_permute  # noqa: E402

LAYER = {"ragged": dict(impl="ragged"), "pallas_xla_permute": dict(impl="pallas", permute="xla"),
         "pallas": dict(impl="pallas", permute="auto")}


def compiled_figures(fn, args, sharding) -> dict:
  """Compiles jit(fn) for the deviceless chip and returns its temporaries, bytes accessed, FLOPs, Mosaic calls."""
  t0 = time.perf_counter()
  lowered = jax.jit(fn, in_shardings=(sharding,) * len(args)).lower(*args)
  compiled = lowered.compile()
  cost, mem = compiled.cost_analysis(), compiled.memory_analysis()
  mib = lambda b: round(b / 2**20, 1)
  return {"temp_MiB": mib(mem.temp_size_in_bytes), "bytes_accessed_MiB": mib(cost["bytes accessed"]),
          "gflop": round(cost.get("flops", 0.0) / 1e9, 2), "mosaic_calls": lowered.as_text().count("tpu_custom_call"),
          "compile_s": round(time.perf_counter() - t0, 1)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", type=int, default=8192)
  ap.add_argument("--experts", type=int, default=8)
  ap.add_argument("--top-k", type=int, default=2)
  ap.add_argument("--d-model", type=int, default=4096)
  ap.add_argument("--d-ff", type=int, default=14336)
  ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  a = ap.parse_args()
  n, e, k, d, f = a.tokens, a.experts, a.top_k, a.d_model, a.d_ff
  sharding = SingleDeviceSharding(topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices[0])
  sds, dt = jax.ShapeDtypeStruct, jnp.dtype(a.dtype)
  shape = dict(tokens=n, experts=e, top_k=k, d_model=d, d_ff=f, dtype=a.dtype, device="v5p (deviceless)")
  print(json.dumps({"shape": shape, "note": "compiled, not timed: no TPU here"}), flush=True)
  layer_args = (sds((n, d), dt), sds((n, k), jnp.int32), sds((n, k), jnp.float32), sds((e, d, f), dt),
                sds((e, d, f), dt), sds((e, f, d), dt))
  out = {}
  for name, kw in LAYER.items():
    def loss(x, ids, gates, wg, wu, wd, kw=kw):
      return jnp.sum(moe_ffn(x, ids, gates, wg, wu, wd, **kw)[0].astype(jnp.float32) ** 2)
    out[name] = compiled_figures(jax.grad(loss, argnums=(0, 2, 3, 4, 5)), layer_args, sharding)
    print(json.dumps({"program": f"moe_ffn grad, {name}", **out[name]}), flush=True)
  rows = n * k
  idx = sds((rows,), jnp.int32)
  alone = {
      "permute_xla": (lambda x, i: moe_permute.gather_rows(x, i, backend="xla"), (sds((n, d), dt), idx)),
      "permute_mosaic": (lambda x, i: moe_permute.gather_rows(x, i), (sds((n, d), dt), idx)),
      "combine_xla": (lambda r, i, w: moe_permute.gather_combine(r, i, w, backend="xla"),
                      (sds((rows, d), dt), sds((n, k), jnp.int32), sds((n, k), jnp.float32))),
      "combine_ops": (lambda r, i, w: ops.combine(r, i.reshape(-1), n, w.reshape(-1)),  # (products in bf16)
                      (sds((rows, d), dt), sds((n, k), jnp.int32), sds((n, k), jnp.float32))),
      "combine_mosaic": (lambda r, i, w: moe_permute.gather_combine(r, i, w),
                         (sds((rows, d), dt), sds((n, k), jnp.int32), sds((n, k), jnp.float32))),
  }
  for name, (fn, args) in alone.items():
    out[name] = compiled_figures(fn, args, sharding)
    print(json.dumps({"program": name, **out[name]}), flush=True)
  ratio = lambda key, a_, b_: round(out[a_][key] / out[b_][key], 3)
  print(json.dumps({
      "benchmark": "moe_permute_tpu", **shape, "compiled_not_timed": True,
      "temp_MiB": {name: out[name]["temp_MiB"] for name in out},
      "bytes_accessed_MiB": {name: out[name]["bytes_accessed_MiB"] for name in out},
      "gflop": {name: out[name]["gflop"] for name in LAYER},
      "pallas_over_xla_permute_bytes": ratio("bytes_accessed_MiB", "pallas", "pallas_xla_permute"),
      "pallas_over_xla_permute_temp": ratio("temp_MiB", "pallas", "pallas_xla_permute"),
  }), flush=True)


if __name__ == "__main__":
  main()
