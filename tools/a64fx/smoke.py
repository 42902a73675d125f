"""The A64FX smoke run of tools/a64fx/run.sh: a tiny GPT (Fugaku-LLM's architecture) forward, one train step
(the repo's make_train_step: optimizer init, loss, grads, AdamW update) and the batched GEMM path
(batched_gemm.matmuls and grouped_matmul, also on Fugaku-LLM 13B's TP6 shapes: per-head attention products at
head_dim 144 over ragged documents, ragged MoE groups at d_model 864), as two jitted programs, results written to an
.npz; `--compare A B` checks that two such files agree (1e-5 of max(1, each array's largest magnitude)) and exits
non-zero otherwise. The GEMMs run on the profile's bucket kernel (batched_gemm.gemm_backend(): XLA's dot natively,
the SVE FFI kernel of jpllm_jax/kernels_sve under emulation when built); `--require-sve` fails unless it is the
SVE kernel, and then also computes the TP6 and MoE sets on XLA's dot in the same process, compares them (1e-5)
and times both (emulated times: a qualitative note only, they say nothing about A64FX).

  python tools/a64fx/smoke.py --make-inputs in.npz          # natively: parameters, batch, GEMM operands
  python tools/a64fx/smoke.py --inputs in.npz --out x86.npz
  qemu-aarch64-static -cpu a64fx ... python3.11 tools/a64fx/smoke.py --inputs in.npz --out a64fx.npz
  python tools/a64fx/smoke.py --compare x86.npz a64fx.npz
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

TOL = 1e-5


def _setup():
  """The computations, each one jitted program: (cfg, forward_and_gemms, init_and_step)."""
  import jax  # pylint: disable=import-outside-toplevel
  from jpllm_jax import batched_gemm as bg, models  # pylint: disable=import-outside-toplevel
  from jpllm_jax.parallel import make_mesh  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from jpllm_jax.train.step import StepConfig, init_state, make_train_step  # pylint: disable=import-outside-toplevel
  cfg = models.preset("fugaku-llm-13b", vocab_size=128, d_model=48, n_layers=2, n_heads=4, n_kv_heads=4,
                      d_ff=96, max_seq_len=32, init_std=0.2)
  # Plain SGD: AdamW's first step is lr * g / |g| elementwise, which turns rounding noise in gradients that are
  # zero in exact arithmetic (the key bias's) into full-size updates of either sign.
  schedule = optax.constant_schedule(0.1)
  tx = optax.sgd(schedule)
  step = make_train_step(cfg, tx, schedule, StepConfig(), make_mesh({"data": 1}, jax.devices()[:1]))

  @jax.jit
  def forward_and_gemms(params, inputs, lhs, rhs, x, w, tp6_lhs, tp6_rhs, moe_x, moe_w):
    return dict(logits=models.forward(cfg, params, inputs), gemms=bg.matmuls(lhs, rhs),
                grouped=bg.grouped_matmul(x, w, GROUPS), **tp6_sets(tp6_lhs, tp6_rhs, moe_x, moe_w))

  @jax.jit
  def init_and_step(params, batch):
    state, metrics = step(init_state(cfg, tx, None, params=params), batch)
    return state["params"], metrics["loss"]

  return cfg, forward_and_gemms, init_and_step


GEMMS = [(37, 144, 50), (40, 144, 50), (9, 20, 7), (33, 100, 144)]
GROUPS = (13, 0, 40, 5)
# Fugaku-LLM 13B, one TP6 shard (36 heads / 6, head_dim 144, d_model 5184 / 6): per document and head the scores
# q k^T [l, 144] x [144, l] and the values p v [l, l] x [l, 144], documents of ragged lengths; MoE expert groups of
# ragged sizes [n_e, 864] x [864, ffn].
HEADS, HEAD_DIM, D_SHARD, MOE_FFN = 6, 144, 864, 96
DOCS = (23, 40, 7)
TP6_GEMMS = [s for l in DOCS for s in [(l, HEAD_DIM, l)] * HEADS + [(l, l, HEAD_DIM)] * HEADS]
MOE_GROUPS = (37, 0, 91, 5, 16, 3)


def tp6_sets(lhs, rhs, x, w, backend=None):
  """The TP6 attention GEMMs and the MoE ragged groups on `backend` (default: the profile's)."""
  from jpllm_jax import batched_gemm as bg  # pylint: disable=import-outside-toplevel
  return dict(tp6=bg.matmuls(lhs, rhs, backend=backend), moe=bg.grouped_matmul(x, w, MOE_GROUPS, backend=backend))


def make_inputs(path: str) -> None:
  """The parameters, batch and GEMM operands both sides use (random init runs natively only: each eager op
  is one more XLA compile, minutes under emulation)."""
  import jax  # pylint: disable=import-outside-toplevel
  from jpllm_jax import models  # pylint: disable=import-outside-toplevel
  cfg = _setup()[0]
  rng = np.random.default_rng(0)
  b, t = 2, 16
  inputs = rng.integers(0, 128, (b, t)).astype(np.int32)
  arrays = dict(inputs=inputs, targets=np.roll(inputs, -1, 1), segment_ids=np.ones((b, t), np.int32),
                positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)), weights=np.ones((b, t), np.float32))
  for i, (m, k, n) in enumerate(GEMMS):
    arrays[f"lhs/{i}"] = rng.standard_normal((m, k)).astype(np.float32)
    arrays[f"rhs/{i}"] = rng.standard_normal((k, n)).astype(np.float32)
  arrays["x"] = rng.standard_normal((sum(GROUPS), 72)).astype(np.float32)
  arrays["w"] = rng.standard_normal((len(GROUPS), 72, 48)).astype(np.float32)
  for i, (m, k, n) in enumerate(TP6_GEMMS):
    arrays[f"tp6_lhs/{i}"] = rng.standard_normal((m, k)).astype(np.float32)
    arrays[f"tp6_rhs/{i}"] = rng.standard_normal((k, n)).astype(np.float32)
  arrays["moe_x"] = rng.standard_normal((sum(MOE_GROUPS), D_SHARD)).astype(np.float32)
  arrays["moe_w"] = (rng.standard_normal((len(MOE_GROUPS), D_SHARD, MOE_FFN)) / 30).astype(np.float32)
  flat, _ = jax.tree_util.tree_flatten_with_path(models.init(cfg, jax.random.key(0)))
  for key, leaf in flat:
    arrays["params/" + jax.tree_util.keystr(key)] = np.asarray(leaf)
  np.savez(path, **arrays)


def _median_s(f, *args, repeats: int = 3) -> float:
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return sorted(times)[len(times) // 2]


def sve_vs_xla(got: dict, tp6_args) -> dict:
  """The TP6 and MoE sets again on XLA's dot in this process: the largest difference from the SVE kernel's
  results (relative to max(1, |largest element|)) and both kernels' times (the median of 3 after a warm-up)."""
  import jax  # pylint: disable=import-outside-toplevel
  xla = jax.jit(lambda *a: tp6_sets(*a, backend="xla"))
  sve = jax.jit(lambda *a: tp6_sets(*a, backend="sve"))
  want = xla(*tp6_args)
  pairs = list(zip(got["tp6"], want["tp6"])) + [(got["moe"], want["moe"])]
  diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) / max(1.0, float(np.abs(np.asarray(b)).max()))
             for a, b in pairs)
  return dict(sve_vs_xla_max_rel_diff=diff, sve_s=round(_median_s(sve, *tp6_args), 4),
              xla_s=round(_median_s(xla, *tp6_args), 4))


def run(inputs_path: str, out: str, require_sve: bool = False) -> int:
  t0 = time.perf_counter()
  import jax  # pylint: disable=import-outside-toplevel
  from jpllm_jax import batched_gemm as bg, cpu, kernels_sve, models  # pylint: disable=import-outside-toplevel
  backend = bg.gemm_backend()
  if require_sve and backend != "sve":
    print(f"--require-sve: the GEMM kernel here is {backend!r} ({kernels_sve.unavailable_reason()})", flush=True)
    return 1
  cfg, forward_and_gemms, init_and_step = _setup()
  t_import = time.perf_counter() - t0
  a = np.load(inputs_path)
  shapes = jax.eval_shape(lambda: models.init(cfg, jax.random.key(0)))
  paths, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  params = jax.tree_util.tree_unflatten(treedef, [a["params/" + jax.tree_util.keystr(p)] for p, _ in paths])
  batch = {k: a[k] for k in ("inputs", "targets", "segment_ids", "positions", "weights")}
  lhs = [a[f"lhs/{i}"] for i in range(len(GEMMS))]
  rhs = [a[f"rhs/{i}"] for i in range(len(GEMMS))]
  tp6_args = ([a[f"tp6_lhs/{i}"] for i in range(len(TP6_GEMMS))], [a[f"tp6_rhs/{i}"] for i in range(len(TP6_GEMMS))],
              a["moe_x"], a["moe_w"])
  results = {}
  check = {}
  with jax.default_matmul_precision("highest"):
    t1 = time.perf_counter()
    got = forward_and_gemms(params, batch["inputs"], lhs, rhs, a["x"], a["w"], *tp6_args)
    results["forward_logits"] = np.asarray(got["logits"])
    results.update({f"gemm/{i}": np.asarray(c) for i, c in enumerate(got["gemms"])})
    results["grouped"] = np.asarray(got["grouped"])
    results.update({f"tp6/{i}": np.asarray(c) for i, c in enumerate(got["tp6"])})
    results["moe"] = np.asarray(got["moe"])
    t2 = time.perf_counter()
    if backend == "sve":
      check = sve_vs_xla(got, tp6_args)
    new_params, loss = init_and_step(params, batch)
    results["train_loss"] = np.asarray(loss)
    for path, leaf in jax.tree_util.tree_flatten_with_path(new_params)[0]:
      results["params/" + jax.tree_util.keystr(path)] = np.asarray(leaf)
    t3 = time.perf_counter()
  np.savez(out, **results)
  prof = cpu.profile()
  if backend == "sve":
    check["sve_fp32_lanes"] = kernels_sve.fp32_lanes()
  print(json.dumps(dict(machine=platform.machine(), profile=prof.name, fp32_lanes=prof.fp32_lanes,
                        gemm_backend=backend, import_s=round(t_import, 1), forward_and_gemms_s=round(t2 - t1, 1),
                        train_step_s=round(t3 - t2, 1), arrays=len(results), **check)), flush=True)
  if check and not check["sve_vs_xla_max_rel_diff"] <= TOL:
    print(f"the SVE kernel differs from XLA's dot by {check['sve_vs_xla_max_rel_diff']} > {TOL}", flush=True)
    return 1
  return 0


def compare(a_path: str, b_path: str) -> int:
  a, b = np.load(a_path), np.load(b_path)
  if sorted(a.files) != sorted(b.files):
    print(f"different arrays: {sorted(set(a.files) ^ set(b.files))}")
    return 1
  worst, bad = 0.0, []
  for k in sorted(a.files):
    scale = max(1.0, float(np.abs(a[k]).max()) if a[k].size else 1.0)
    d = float(np.abs(a[k] - b[k]).max()) / scale if a[k].size else 0.0
    worst = max(worst, d)
    if a[k].shape != b[k].shape or not d <= TOL:
      bad.append((k, d))
  print(json.dumps(dict(arrays=len(a.files), max_rel_diff=worst, tol=TOL, failed=[k for k, _ in bad])))
  return 1 if bad else 0


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--make-inputs", metavar="NPZ")
  ap.add_argument("--inputs", metavar="NPZ")
  ap.add_argument("--out", metavar="NPZ")
  ap.add_argument("--compare", nargs=2, metavar="NPZ")
  ap.add_argument("--require-sve", action="store_true", help="fail unless the GEMMs run on the SVE kernel")
  args = ap.parse_args()
  if args.compare:
    return compare(*args.compare)
  if args.make_inputs:
    make_inputs(args.make_inputs)
    return 0
  return run(args.inputs, args.out, args.require_sve)


if __name__ == "__main__":
  sys.exit(main())
