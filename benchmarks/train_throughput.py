r"""Train-step throughput and MFU of a small Llama on this machine (issue: training stack).

Llama d_model 512, 8 layers, 8 heads, FFN 1536, vocab 32000, seq 512, batch 8, in f32 and bf16 compute.
Tokens/s is the result; MFU is the fraction of this machine's measured XLA matmul rate (a jitted square f32
matmul, `flops.measure_matmul_peak`), not of a datasheet peak. On a shared machine that rate is as noisy as the
steps (98 vs 146 GFLOP/s measured before and after one run), so a peak sample is taken before every timed step,
in the same process, and MFU is the median model FLOP/s over the median peak. Prints one JSON line per dtype
and a final JSON line, tokens/s first.

  python benchmarks/train_throughput.py [--steps 5] [--dtypes float32,bfloat16] [--quick]

Like `experiments.train`, it runs with glibc huge pages for XLA's buffers (jpllm_jax/cpu.py);
JPLLM_NO_HUGE_PAGES=1 measures without them.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jpllm_jax import cpu  # noqa: E402
from jpllm_jax.models import llama  # noqa: E402
from jpllm_jax.parallel import make_mesh  # noqa: E402
from jpllm_jax.train import flops  # noqa: E402
from jpllm_jax.train.optimizer import make_optimizer  # noqa: E402
from jpllm_jax.train.step import StepConfig, init_state, make_train_step, state_shardings  # noqa: E402


def compiled_step(cfg, batch: int, seq: int, rng: np.random.Generator):
  """(step, state, batch of random tokens, metrics) of `cfg`'s train step on a data-parallel mesh of every
  device, after one step that compiled it."""
  mesh = make_mesh({"data": -1})
  tx, schedule = make_optimizer(3e-4, 10, 1000)
  state = jax.jit(functools.partial(init_state, cfg, tx), out_shardings=state_shardings(cfg, tx, mesh))(
      jax.random.key(0))
  step = make_train_step(cfg, tx, schedule, StepConfig(), mesh)
  data = dict(inputs=rng.integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32),
              targets=rng.integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32),
              segment_ids=np.ones((batch, seq), np.int32),
              positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
              weights=np.ones((batch, seq), np.float32))
  state, m = step(state, data)  # compile
  jax.block_until_ready(m)
  return step, state, data, m


def run(dtype: str, steps: int, batch: int, seq: int, remat: str) -> dict:
  cfg = llama.llama2(vocab_size=32000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_ff=1536,
                     max_seq_len=seq, dtype=dtype, remat=remat)
  step, state, data, m = compiled_step(cfg, batch, seq, np.random.default_rng(0))
  times, peaks = [], []
  for _ in range(steps):  # peak samples interleaved with the steps, so that both see the same load
    peak = flops.measure_matmul_peaks(peaks)
    t0 = time.perf_counter()
    state, m = step(state, data)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  t = float(np.median(times))
  tokens = batch * seq
  model_tflops = flops.train_flops_per_token(cfg, seq) * tokens / t / 1e12
  return {"tokens_per_s": round(tokens / t, 1), "dtype": dtype, "remat": remat, "step_s": round(t, 4),
          "step_s_range": [round(min(times), 4), round(max(times), 4)], "model_tflops": round(model_tflops, 5),
          "peak_tflops": round(peak / 1e12, 5),
          "peak_tflops_range": [round(min(peaks) / 1e12, 5), round(max(peaks) / 1e12, 5)],
          "mfu": round(model_tflops * 1e12 / peak, 4), "loss": round(float(m["loss"]), 4)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--remat", default="none")
  ap.add_argument("--quick", action="store_true", help="a check that it runs: batch 2, seq 128, float32, 3 steps")
  args = ap.parse_args()
  if args.quick:
    args.batch, args.seq, args.dtypes, args.steps = 2, 128, "float32", 3
  results = []
  for dtype in args.dtypes.split(","):
    r = run(dtype, args.steps, args.batch, args.seq, args.remat)
    print(json.dumps(r), flush=True)
    results.append(r)
  best = max(results, key=lambda r: r["tokens_per_s"])
  print(json.dumps({"benchmark": "train_throughput", "tokens_per_s": best["tokens_per_s"], "dtype": best["dtype"],
                    "model_tflops": best["model_tflops"], "peak_tflops": best["peak_tflops"], "mfu": best["mfu"],
                    "device": jax.devices()[0].platform, "batch": args.batch, "seq": args.seq,
                    "huge_pages": "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""),
                    "results": results}))


if __name__ == "__main__":
  cpu.use_huge_pages()
  main()
