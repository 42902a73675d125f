r"""Memory, FLOPs, bubble and step time of the pipeline schedules (issue 15) on 8 fake CPU devices.

A Llama-like stack built from jnp ops (RMSNorm, causal multi-head attention, SwiGLU; 16 layers, d_model 128,
4 heads, 64 tokens, 8 rows per micro-batch and data rank, vocabulary 512, tied embedding) runs through
`pipeline_value_and_grad` on a mesh of stage 4 x data 2 for GPipe, 1F1B and interleaved (V = 2) with M = 4, 8, 16.
The layers run without rematerialisation by default (`--remat none`): a forward tick keeps every activation its
backward needs in the schedule's residual slot, which is the memory Megatron's 1F1B argument is about (1F1B holds
at most S micro-batches, GPipe M). `--remat dots` saves the matmul outputs only (per-layer `jax.checkpoint` with
`checkpoint_dots`), `--remat full` the layers' inputs (per-layer `jax.checkpoint`).
Per run it prints one JSON line: the compiled step's peak memory per device (`memory_analysis()`: arguments +
outputs + temporaries - aliased), its FLOPs per device (`cost_analysis()`; XLA counts a while loop's body once and a
conditional as its largest branch, so this is one tick's most expensive branch: a program that ran both branches
and selected would show forward + backward), the FLOPs a device executes (its schedule row's forward and backward
ticks times the compiled cost of a middle chunk's forward, which keeps its residuals, and of its backward from
them: the executor's `split_vjp`, so a backward does not recompute the forward unless the remat policy says so),
the residual bytes of one slot, the bubble fraction next to Megatron's (S - 1) / (V M + S - 1), and the step time
(median of 3; fake devices share the machine's cores, so times carry no goal). The final JSON line holds
`memory_1f1b_over_gpipe` at M = 16 (goal <= 0.5) and `bubble_interleaved_over_1f1b` at M = 16 (goal about 1 / V).

  python benchmarks/pipeline_schedule.py [--micro 4,8,16] [--virtual 2] [--remat none|dots|full]
                                         [--png benchmarks/pipeline_1f1b.png]

--png draws the 1F1B tick table (S = 4, M = 8) with matplotlib, the picture in the README.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from jpllm_jax.parallel import make_mesh  # noqa: E402
from jpllm_jax.parallel.pipeline import pipeline_value_and_grad, split_vjp  # noqa: E402
from jpllm_jax.parallel.pipeline_schedule import (BACKWARD, FORWARD, make_schedule, megatron_bubble,  # noqa: E402
                                                  render_png)

LAYERS, D, HEADS, FF, T, ROWS, VOCAB, S = 16, 128, 4, 344, 64, 8, 512, 4


def rms(x, scale):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale


def layer(h, w):
  """One pre-norm Llama block: causal attention and SwiGLU, both residual."""
  x = rms(h, w["ln1"])
  q, k, v = (jnp.einsum("btd,dhk->bthk", x, w[n]) for n in ("wq", "wk", "wv"))
  att = jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(D // HEADS)
  att = jnp.where(jnp.tril(jnp.ones((T, T), bool)), att, -1e9)
  h = h + jnp.einsum("bqhk,hkd->bqd", jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(att, -1), v), w["wo"])
  x = rms(h, w["ln2"])
  return h + (jax.nn.silu(x @ w["wg"]) * (x @ w["wu"])) @ w["wd"], None


REMAT = {"none": layer, "dots": jax.checkpoint(layer, policy=jax.checkpoint_policies.checkpoint_dots),
         "full": jax.checkpoint(layer)}


def make_stage_fn(remat: str):
  def stage_fn(p, h, batch=None, v=None):
    """The chunk's layers under the remat policy; unrolled so that cost_analysis counts every layer."""
    return jax.lax.scan(REMAT[remat], h, p, unroll=True)[0]
  return stage_fn


def embed_fn(sh, batch):
  return sh["embed"][batch["tokens"]]


def loss_fn(sh, h, batch):
  logits = rms(h, sh["norm"]) @ sh["embed"].T
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
  return jnp.sum(nll), jnp.asarray(nll.size, jnp.float32)


def init():
  k = iter(jax.random.split(jax.random.key(0), 16))
  hd = D // HEADS
  n = lambda *shape: jax.random.normal(next(k), (LAYERS, *shape)) / np.sqrt(shape[0])  # noqa: E731
  sp = {"ln1": jnp.ones((LAYERS, D)), "ln2": jnp.ones((LAYERS, D)), "wq": n(D, HEADS, hd), "wk": n(D, HEADS, hd),
        "wv": n(D, HEADS, hd), "wo": n(HEADS, hd, D), "wg": n(D, FF), "wu": n(D, FF), "wd": n(FF, D)}
  return sp, {"embed": jax.random.normal(next(k), (VOCAB, D)) * 0.02, "norm": jnp.ones((D,))}


def chunk_costs(stage_fn, sp, sh, batch, layers_per_chunk: int) -> tuple[float, float, int]:
  """Compiled FLOPs of one middle chunk's forward (keeping its residuals) and of its backward (from them), on one
  device, as the executor splits them (`split_vjp`); and the bytes of the residuals one slot keeps."""
  p = jax.tree.map(lambda w: w[:layers_per_chunk], sp)
  h, v = embed_fn(sh, batch), jnp.int32(0)
  split = split_vjp(lambda p, h, b, v: (stage_fn(p, h, b, v), {}), p, h, batch, v)
  fwd = jax.jit(split.forward).lower(p, h, batch, v).compile().cost_analysis()["flops"]
  res = jax.eval_shape(split.forward, p, h, batch, v)[2]
  bwd_fn = jax.jit(lambda res, g, p, b: split.backward(res, g, p, None, b, v))
  bwd = bwd_fn.lower(res, h, p, batch).compile().cost_analysis()["flops"]
  return fwd, bwd, sum(r.size * r.dtype.itemsize for r in split.residuals)


def run(kind: str, M: int, V: int, remat: str, mesh, sp, sh) -> dict:
  stage_fn = make_stage_fn(remat)
  sched = make_schedule(kind, S, M, V)
  k1, k2 = jax.random.split(jax.random.key(1))
  mb = {"tokens": jax.random.randint(k1, (M, ROWS * 2, T), 0, VOCAB),
        "targets": jax.random.randint(k2, (M, ROWS * 2, T), 0, VOCAB)}  # ROWS per data rank
  mb = jax.device_put(mb, NamedSharding(mesh, P(None, "data")))
  step = jax.jit(lambda sp, sh, mb: pipeline_value_and_grad(stage_fn, embed_fn, loss_fn, sp, sh, mb, mesh=mesh,
                                                            schedule=sched))
  compiled = step.lower(sp, sh, mb).compile()
  mem = compiled.memory_analysis()
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
  times = []
  for _ in range(4):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(sp, sh, mb))
    times.append(time.perf_counter() - t0)
  f, b, res_bytes = chunk_costs(stage_fn, sp, sh, jax.tree.map(lambda a: a[0, :ROWS], mb), LAYERS // (S * V))
  act = sched.field("action")
  executed = max(float(np.sum(act[:, s] == FORWARD) * f + np.sum(act[:, s] == BACKWARD) * b) for s in range(S))
  return {"schedule": kind, "S": S, "M": M, "V": V, "remat": remat, "ticks": sched.ticks,
          "res_slots": sched.res_slots, "residual_mib_per_slot": round(res_bytes / 2**20, 3),
          "peak_memory_mib": round(peak / 2**20, 3), "temp_memory_mib": round(mem.temp_size_in_bytes / 2**20, 3),
          "flops_compiled_per_device": compiled.cost_analysis()["flops"], "flops_executed_per_device": executed,
          "bubble": round(sched.bubble_fraction, 4), "bubble_megatron": round(megatron_bubble(S, M, V), 4),
          "step_s": round(float(np.median(times[1:])), 4)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--micro", default="4,8,16")
  ap.add_argument("--virtual", type=int, default=2)
  ap.add_argument("--remat", default="none", choices=sorted(REMAT))
  ap.add_argument("--png", default=None)
  args = ap.parse_args()
  if args.png:
    render_png(make_schedule("1f1b", S, 8), args.png)
  mesh = make_mesh({"stage": S, "data": 2})
  sp, sh = init()
  results = {}
  for M in map(int, args.micro.split(",")):
    for kind, V in (("gpipe", 1), ("1f1b", 1), ("interleaved", args.virtual)):
      r = results[kind, M] = run(kind, M, V, args.remat, mesh, sp, sh)
      print(json.dumps(r), flush=True)
  M = max(m for _, m in results)
  g, o, i = results["gpipe", M], results["1f1b", M], results["interleaved", M]
  print(json.dumps({"M": M, "remat": args.remat,
                    "memory_1f1b_over_gpipe": round(o["peak_memory_mib"] / g["peak_memory_mib"], 3),
                    "temp_memory_1f1b_over_gpipe": round(o["temp_memory_mib"] / g["temp_memory_mib"], 3),
                    "flops_1f1b_over_gpipe": round(o["flops_compiled_per_device"] / g["flops_compiled_per_device"], 4),
                    "executed_flops_1f1b_over_gpipe":
                        round(o["flops_executed_per_device"] / g["flops_executed_per_device"], 4),
                    "bubble_interleaved_over_1f1b": round(i["bubble"] / o["bubble"], 3),
                    "goal_bubble": 1 / args.virtual,
                    "step_s_1f1b_over_gpipe": round(o["step_s"] / g["step_s"], 3)}))


if __name__ == "__main__":
  main()
