"""The A64FX smoke run of tools/a64fx/run.sh: a tiny GPT (Fugaku-LLM's architecture) forward, one train step
(the repo's make_train_step: optimizer init, loss, grads, AdamW update) and the batched GEMM path
(batched_gemm.matmuls and grouped_matmul), as two jitted programs, results written to an .npz; `--compare A B`
checks that two such files agree (1e-5 of max(1, each array's largest magnitude)) and exits non-zero otherwise.

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
  def forward_and_gemms(params, inputs, lhs, rhs, x, w):
    return dict(logits=models.forward(cfg, params, inputs), gemms=bg.matmuls(lhs, rhs),
                grouped=bg.grouped_matmul(x, w, GROUPS))

  @jax.jit
  def init_and_step(params, batch):
    state, metrics = step(init_state(cfg, tx, None, params=params), batch)
    return state["params"], metrics["loss"]

  return cfg, forward_and_gemms, init_and_step


GEMMS = [(37, 144, 50), (40, 144, 50), (9, 20, 7), (33, 100, 144)]
GROUPS = (13, 0, 40, 5)


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
  flat, _ = jax.tree_util.tree_flatten_with_path(models.init(cfg, jax.random.key(0)))
  for key, leaf in flat:
    arrays["params/" + jax.tree_util.keystr(key)] = np.asarray(leaf)
  np.savez(path, **arrays)


def run(inputs_path: str, out: str) -> None:
  t0 = time.perf_counter()
  import jax  # pylint: disable=import-outside-toplevel
  from jpllm_jax import cpu, models  # pylint: disable=import-outside-toplevel
  cfg, forward_and_gemms, init_and_step = _setup()
  t_import = time.perf_counter() - t0
  a = np.load(inputs_path)
  shapes = jax.eval_shape(lambda: models.init(cfg, jax.random.key(0)))
  paths, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  params = jax.tree_util.tree_unflatten(treedef, [a["params/" + jax.tree_util.keystr(p)] for p, _ in paths])
  batch = {k: a[k] for k in ("inputs", "targets", "segment_ids", "positions", "weights")}
  lhs = [a[f"lhs/{i}"] for i in range(len(GEMMS))]
  rhs = [a[f"rhs/{i}"] for i in range(len(GEMMS))]
  results = {}
  with jax.default_matmul_precision("highest"):
    t1 = time.perf_counter()
    got = forward_and_gemms(params, batch["inputs"], lhs, rhs, a["x"], a["w"])
    results["forward_logits"] = np.asarray(got["logits"])
    results.update({f"gemm/{i}": np.asarray(c) for i, c in enumerate(got["gemms"])})
    results["grouped"] = np.asarray(got["grouped"])
    t2 = time.perf_counter()
    new_params, loss = init_and_step(params, batch)
    results["train_loss"] = np.asarray(loss)
    for path, leaf in jax.tree_util.tree_flatten_with_path(new_params)[0]:
      results["params/" + jax.tree_util.keystr(path)] = np.asarray(leaf)
    t3 = time.perf_counter()
  np.savez(out, **results)
  prof = cpu.profile()
  print(json.dumps(dict(machine=platform.machine(), profile=prof.name, fp32_lanes=prof.fp32_lanes,
                        import_s=round(t_import, 1), forward_and_gemms_s=round(t2 - t1, 1),
                        train_step_s=round(t3 - t2, 1), arrays=len(results))), flush=True)


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
  args = ap.parse_args()
  if args.compare:
    return compare(*args.compare)
  if args.make_inputs:
    make_inputs(args.make_inputs)
    return 0
  run(args.inputs, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
