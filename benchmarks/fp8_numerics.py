r"""FP8 GEMM error against FP32: tensorwise vs blockwise scaling, with and without outliers, with and without the
FP32 promotion of partial sums, at K = 1024, 4096, 8192. Emulated on CPU (fp8_quant.gemm_xla); prints a markdown
table and a final JSON line.

  python -m benchmarks.fp8_numerics            # the README table (~1 minute on 2 cores)
  python -m benchmarks.fp8_numerics --small    # K = 1024 only

Error: the mean over tokens (rows) of |y - y_ref| / |y_ref| per row, y_ref the float64 product of the unquantised
operands, so outlier tokens cannot hide the others' error. x [256, K] ~ N(0, 1), w [K, 128] ~ N(0, 0.02^2).
Outliers: tokens (every 32nd row) x1e3 or x1e5; channels (every 64th column of x, in all tokens) x100.
Accumulation: "fp32" adds each 128-wide K tile's product, scaled, into FP32 (the kernels); "promoted" models a
tensor core's ~14-bit accumulator (13 mantissa bits, truncated after every 32 elements of K; DeepSeek-V3 3.3.2)
moved to FP32 every 128 elements; "narrow" keeps all of K in the narrow sum. Signed data sums with cancellation,
so the narrow accumulator's error shows best in the |x| @ |w| rows (all terms positive).
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import fp8_quant as fq
from kernels_pallas.fp8_gemm import quantize_operands

M, N = 256, 128
OUTLIERS = ("none", "tokens x1e3", "tokens x1e5", "channels x100")
ACCUMULATION = {"fp32": dict(), "promoted": dict(mma_bits=13, promote=True), "narrow": dict(mma_bits=13, promote=False)}


def operands(k: int, outliers: str, positive: bool = False, seed: int = 0):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (M, k), jnp.float32)
  w = 0.02 * jax.random.normal(kw, (k, N), jnp.float32)
  if positive:
    x, w = jnp.abs(x), jnp.abs(w)
  if outliers.startswith("tokens"):
    x = x.at[::32].multiply(float(outliers.split("x")[1]))
  elif outliers.startswith("channels"):
    x = x.at[:, ::64].multiply(100.0)
  return x, w


def token_error(y, x, w) -> float:
  ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  y = np.asarray(y, np.float64)
  return float(np.mean(np.linalg.norm(y - ref, axis=1) / np.linalg.norm(ref, axis=1)))


def errors(k: int, outliers: str, positive: bool = False) -> dict[str, float]:
  x, w = operands(k, outliers, positive)
  out = {}
  for scaling in ("tensorwise", "blockwise"):
    ops = quantize_operands(x, w, scaling=scaling)
    for acc, kw in ACCUMULATION.items():
      y = jax.jit(lambda *o, kw=kw: fq.gemm_xla(*o, **kw))(*ops)
      out[f"{scaling}/{acc}"] = token_error(y, x, w)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="K = 1024 only")
  args = parser.parse_args()
  ks = (1024,) if args.small else (1024, 4096, 8192)
  cases = [(k, o, False) for k in ks for o in OUTLIERS] + [(k, "none", True) for k in ks]
  cols = [f"{s}/{a}" for s in ("tensorwise", "blockwise") for a in ACCUMULATION]
  print("| K | operands | " + " | ".join(cols) + " |")
  print("|---|---|" + "---|" * len(cols))
  rows = []
  for k, o, pos in cases:
    e = errors(k, o, pos)
    rows.append({"k": k, "outliers": o, "positive": pos, **e})
    label = "abs(x) @ abs(w)" if pos else o
    print(f"| {k} | {label} | " + " | ".join(f"{100 * e[c]:.2f}%" for c in cols) + " |", flush=True)
  print(json.dumps({"benchmark": "fp8_numerics", "emulated": "cpu (fp8_quant.gemm_xla)", "m": M, "n": N,
                    "rows": rows}))


if __name__ == "__main__":
  main()
