r"""FP8 speed on a GPU: the blockwise FP8 GEMM vs BF16 `jnp.dot`, the routed experts' grouped GEMM in FP8 vs BF16,
and the train step of a ~1B Llama with `matmul=fp8_blockwise` vs BF16. Prints one JSON line per measurement and
a final JSON line with the speed-ups.

  python -m benchmarks.fp8_gemm            # a GPU machine (H100/H200): a few minutes
  python -m benchmarks.fp8_gemm --small    # tiny sizes, any backend (CPU: the XLA fallback; a check that it runs)

Goals on an H100/H200 (issue 16): GEMM >= 1.5x BF16, train step >= 1.3x. Expected output: lines
  {"kind": "gemm", "size": 4096, "bf16_tflops": ..., "fp8_tflops": ..., "speedup": ...}   (4096, 8192, 16384)
  {"kind": "grouped", "experts": 64, "rows": 16384, ..., "speedup": ...}
  {"kind": "train_step", "params": ~1.1e9, "bf16_tokens_per_s": ..., "fp8_tokens_per_s": ..., "speedup": ...}
  {"benchmark": "fp8_gemm", "gemm_speedup": {...}, "grouped_speedup": ..., "train_step_speedup": ..., ...}
Not yet run on a GPU (none was lent); on CPU the FP8 path is emulated and slower than BF16 by design.
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jpllm_jax.models import fp8, llama
from jpllm_jax.moe import ops
from benchmarks.train_throughput import compiled_step
from kernels_pallas.fp8_gemm import fp8_matmul


def timed(fn, *args, iters: int) -> float:
  """Median seconds of `fn(*args)` after one compiling call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def gemm(size: int, iters: int) -> dict:
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (size, size), jnp.bfloat16)
  w = (0.02 * jax.random.normal(kw, (size, size))).astype(jnp.bfloat16)
  flop = 2 * size ** 3
  t_bf16 = timed(jax.jit(jnp.dot), x, w, iters=iters)
  t_fp8 = timed(jax.jit(functools.partial(fp8_matmul, scaling="blockwise")), x, w, iters=iters)
  return {"kind": "gemm", "size": size, "bf16_tflops": round(flop / t_bf16 / 1e12, 2),
          "fp8_tflops": round(flop / t_fp8 / 1e12, 2), "speedup": round(t_bf16 / t_fp8, 3)}


def grouped(experts: int, rows: int, d: int, f: int, iters: int) -> dict:
  """x [rows, d] routed to `experts` groups of random sizes times w [E, d, f]: BF16 `ragged_dot` vs the FP8 block
  layout (`ops.blocked_mm_fp8`, what the policy runs for the routed experts)."""
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(k1, (rows, d), jnp.bfloat16)
  w = (0.02 * jax.random.normal(k2, (experts, d, f))).astype(jnp.bfloat16)
  ids = jnp.sort(jax.random.randint(k3, (rows,), 0, experts))
  sizes = jnp.zeros((experts,), jnp.int32).at[ids].add(1)
  bm = ops.default_block_rows(rows, experts)
  nb, base, block_expert, _ = ops.block_tables(sizes, bm, rows)
  rank = jnp.arange(rows) - (jnp.cumsum(sizes) - sizes)[ids]
  row_src = jnp.full((nb * bm,), rows, jnp.int32).at[base[ids] + rank].set(jnp.arange(rows, dtype=jnp.int32))
  x_blocks = jnp.take(x, row_src, axis=0, mode="fill", fill_value=0)
  flop = 2 * rows * d * f
  t_bf16 = timed(jax.jit(lambda x, w: jax.lax.ragged_dot(x, w, sizes)), x, w, iters=iters)
  pol = fp8.Policy("blockwise")
  t_fp8 = timed(jax.jit(lambda x, w: ops.blocked_mm_fp8(pol, x, w, block_expert, bm)), x_blocks, w, iters=iters)
  return {"kind": "grouped", "experts": experts, "rows": rows, "d": d, "f": f, "block_rows": bm,
          "bf16_tflops": round(flop / t_bf16 / 1e12, 2), "fp8_tflops": round(flop / t_fp8 / 1e12, 2),
          "speedup": round(t_bf16 / t_fp8, 3)}


def train_step(model: dict, batch: int, seq: int, iters: int) -> dict:
  out = {"kind": "train_step", "batch": batch, "seq": seq}
  rng = np.random.default_rng(0)
  for matmul in ("default", "fp8_blockwise"):
    cfg = llama.llama2(**model, max_seq_len=seq, dtype="bfloat16", matmul=matmul)
    step, state, data, m = compiled_step(cfg, batch, seq, rng)
    times = []
    for _ in range(iters):
      t0 = time.perf_counter()
      state, m = step(state, data)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    key = "bf16" if matmul == "default" else "fp8"
    out[f"{key}_tokens_per_s"] = round(batch * seq / float(np.median(times)), 1)
    out[f"{key}_loss"] = round(float(m["loss"]), 4)
    out["params"] = int(sum(np.prod(p.shape) for p in jax.tree.leaves(state["params"])))
    del state
  out["speedup"] = round(out["fp8_tokens_per_s"] / out["bf16_tokens_per_s"], 3)
  return out


# ~1.1B parameters (TinyLlama's shape), and a tiny one for --small.
LLAMA_1B = dict(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632)
LLAMA_TINY = dict(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--small", action="store_true", help="tiny sizes: a check that it runs on any backend")
  ap.add_argument("--iters", type=int, default=10)
  args = ap.parse_args()
  if args.small:
    sizes, grouped_args, model, batch, seq, iters = (256,), (4, 512, 256, 128), LLAMA_TINY, 2, 128, 2
  else:
    sizes, grouped_args, model, batch, seq, iters = (4096, 8192, 16384), (64, 16384, 4096, 1536), LLAMA_1B, 4, 2048, \
        args.iters
  results = []
  for size in sizes:
    results.append(gemm(size, iters))
    print(json.dumps(results[-1]), flush=True)
  results.append(grouped(*grouped_args, iters=iters))
  print(json.dumps(results[-1]), flush=True)
  results.append(train_step(model, batch, seq, iters))
  print(json.dumps(results[-1]), flush=True)
  print(json.dumps({"benchmark": "fp8_gemm", "device": jax.devices()[0].device_kind, "small": args.small,
                    "gemm_speedup": {r["size"]: r["speedup"] for r in results if r["kind"] == "gemm"},
                    "grouped_speedup": results[-2]["speedup"], "train_step_speedup": results[-1]["speedup"],
                    "goals": {"gemm": 1.5, "train_step": 1.3}, "results": results}))


if __name__ == "__main__":
  main()
