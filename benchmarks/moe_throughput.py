r"""Forward+backward throughput of one MoE expert layer (issue: mixture of experts) on this machine.

d_model 1024, 64 experts, top-8, expert FFN 512, 4096 tokens, f32, uniform random routing. In one process it
times the value-and-gradient (wrt x, gates and the three expert weights) of `jpllm_jax.moe.moe_ffn` with our
path ("auto": "padded" on CPU) and with impl="ragged" (`jax.lax.ragged_dot`), and of the dense SwiGLU FFN with
the same active FLOPs (d_ff = 8 * 512 on the same tokens). XLA:CPU lowers ragged_dot to a masked product over
all experts (E times the FLOPs and memory: ~39 GB at 4096 tokens), so that path runs on the first
--ragged-tokens tokens; every path is reported in FLOP/s of its routed (active) FLOPs. Each is compiled and
run once, then timed over --repeats runs (median). Ours and dense take turns, so that load from other
processes slows them alike, and each timed run follows an untimed run of the same step, as a training loop's
steps follow each other. Timing single runs in turn measured page faults instead (2-core CPU, glibc huge
pages): our step (1.36 GB of temporaries, the dense one 0.40 GB) took 2.1 s after itself but 2.8-3.2 s after
the dense step, 1.2-1.3 s of it system time (getrusage), while the dense step took 1.65 s either way; the ratio
then swung between 0.52 and 0.70 from run to run. ragged_dot's runs come last, one after the other: its dense
lowering faults in ~5 s of system time on a run after another step, which slowed the runs that followed it.
It prints one JSON line per path and a final JSON line with the FLOP/s and the ratios ours/ragged and
ours/dense.

  python benchmarks/moe_throughput.py [--tokens 4096] [--repeats 3]

Results, 2026-11-27, f32, GFLOP/s of routed FLOPs (ours / ragged_dot / dense):
  2 quiet CPU cores, huge pages: 144.2 / 2.46 / 188.1 and 145.9 / 2.62 / 181.2, so ours/ragged 59x and 56x,
    ours/dense 0.77 and 0.81 ("padded": C = 568 rows per expert for a largest group of 562, mean 512); without
    huge pages (JPLLM_NO_HUGE_PAGES=1) 126.7 / - / 178.9, 0.71.
  one H200 (JAX 0.11.2, --ragged-tokens 4096, TF32, an earlier version): 49,150 / 3,660 / 186,300 ("pallas";
    13x and 0.26).

Like the other benchmarks it runs with glibc huge pages (jpllm_jax/cpu.py); JPLLM_NO_HUGE_PAGES=1 turns that off.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jpllm_jax import cpu  # noqa: E402
from jpllm_jax.models import layers  # noqa: E402
from jpllm_jax.moe import default_impl, moe_ffn  # noqa: E402


def dense_ffn(x, gates, w_gate, w_up, w_down, expert_ids):
  """The dense SwiGLU baseline (gates and expert_ids unused, kept for the same signature)."""
  del gates, expert_ids
  h = jax.nn.silu(layers.matmul("nd,df->nf", x, w_gate)) * layers.matmul("nd,df->nf", x, w_up)
  return layers.matmul("nf,fd->nd", h, w_down)


def grad_step(fn, args, expert_ids, dy):
  """The jitted value-and-grad of sum(fn(*args, expert_ids) * dy) wrt args, compiled and run once; returns a
  function that runs it and waits."""
  loss = lambda *a: jnp.vdot(fn(*a), dy)
  step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))
  jax.block_until_ready(step(*args, expert_ids))
  return lambda: jax.block_until_ready(step(*args, expert_ids))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--d-model", type=int, default=1024)
  ap.add_argument("--experts", type=int, default=64)
  ap.add_argument("--top-k", type=int, default=8)
  ap.add_argument("--d-expert", type=int, default=512)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--paths", default="ours,ragged,dense")
  ap.add_argument("--ragged-tokens", type=int, default=512,
                  help="tokens of the ragged_dot path (its dense lowering on CPU needs ~39 GB at 4096)")
  args = ap.parse_args()
  n, d, e, k, f = args.tokens, args.d_model, args.experts, args.top_k, args.d_expert
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  ids = jnp.asarray(np.argsort(rng.random((n, e)), axis=1)[:, :k], jnp.int32)  # k distinct uniform experts
  gates = jnp.asarray(rng.dirichlet(np.ones(k), size=n), jnp.float32)
  w = [jnp.asarray(rng.normal(size=s) / np.sqrt(s[1]), jnp.float32) for s in [(e, d, f), (e, d, f), (e, f, d)]]
  dense_w = [jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32) for s in [(d, k * f), (d, k * f),
                                                                                       (k * f, d)]]
  dy = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  flops = lambda tokens: 3 * 2 * 3 * tokens * k * d * f  # 3 matmuls of 2 N k D F FLOPs, forward + backward (3x)
  load = np.bincount(np.asarray(ids).ravel(), minlength=e)
  routed = lambda impl: (lambda x, g, wg, wu, wd, ids: moe_ffn(x, ids, g, wg, wu, wd, impl=impl)[0])
  rt = min(n, args.ragged_tokens)
  paths = {"ours": (routed("auto"), [x, gates, *w], ids, dy, n),
           "ragged": (routed("ragged"), [x[:rt], gates[:rt], *w], ids[:rt], dy[:rt], rt),
           "dense": (dense_ffn, [x, gates, *dense_w], ids, dy, n)}
  names = args.paths.split(",")
  steps = {name: grad_step(*paths[name][:4]) for name in names}
  times = {name: [] for name in names}

  def timed(name):
    t0 = time.perf_counter()
    steps[name]()
    times[name].append(time.perf_counter() - t0)

  for _ in range(args.repeats):  # interleaved, so that load from other processes hits every path alike
    for name in names:
      if name != "ragged":
        steps[name]()  # untimed: the timed run follows a run of the same step, as in a training loop
        timed(name)
  for _ in range(args.repeats if "ragged" in names else 0):  # last: see the module docstring
    timed("ragged")
  results = {}
  for name in names:
    t = float(np.median(times[name]))
    fl = flops(paths[name][4])
    results[name] = {"path": name, "tokens": paths[name][4], "step_s": round(t, 4), "gflops": round(fl / t / 1e9, 2),
                     "gflops_best": round(fl / min(times[name]) / 1e9, 2)}
    print(json.dumps(results[name]), flush=True)
  gf = {name: r["gflops"] for name, r in results.items()}
  ratio = lambda a, b: round(gf[a] / gf[b], 3) if a in gf and b in gf else None
  print(json.dumps({"benchmark": "moe_throughput", "device": jax.devices()[0].platform, "impl": default_impl(),
                    "huge_pages": "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""),
                    "shape": {"tokens": n, "d_model": d, "experts": e, "top_k": k, "d_expert": f},
                    "max_load": int(load.max()), "mean_load": n * k / e, "gflop_per_step": round(flops(n) / 1e9, 1),
                    "gflops": gf, "ours_over_ragged": ratio("ours", "ragged"),
                    "ours_over_dense": ratio("ours", "dense")}))


if __name__ == "__main__":
  cpu.use_huge_pages()
  main()
